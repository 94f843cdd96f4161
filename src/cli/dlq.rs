//! `burrow dlq list|show|export|replay|purge`.

use std::{io::Write as _, ops::ControlFlow, path::PathBuf, time::Duration};

use clap::{Args, Subcommand};

use super::{
    CliError, CliResult,
    output::{Out, write_stdout},
};
use crate::{
    Publisher, Settings,
    dlq::{self, Filter, Progress},
};

#[derive(Debug, Subcommand)]
pub(super) enum DlqAction {
    /// A table of dead letters: id, event, reason, handler, attempts, last error, age.
    List {
        #[command(flatten)]
        select: Select,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One dead letter's headers, properties and body.
    Show {
        /// Its message id.
        id: String,
    },
    /// Write dead letters as JSON lines (headers, properties, body as UTF-8
    /// or base64), e.g. to keep what a purge removes; nothing is removed.
    Export {
        #[command(flatten)]
        select: Select,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Write to this file (created; an existing file is refused) instead of stdout.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Send dead letters back to this app's own queue (confirmed, then removed
    /// from the dead-letter queue); only the handlers that failed run again.
    Replay {
        #[command(flatten)]
        select: Select,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Show what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete dead letters for good (`dlq export` first keeps a copy).
    Purge {
        #[command(flatten)]
        select: Select,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Show what would be deleted; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
}

/// Which letters a command acts on; every option given must hold.
#[derive(Debug, Args)]
pub(super) struct Select {
    /// Only this event type (topic patterns allowed: Card*.#).
    #[arg(long)]
    event: Option<String>,
    /// Only letters this handler failed on (a replay reruns only it).
    #[arg(long)]
    handler: Option<String>,
    /// Only letters parked for this reason (permanent, undecodable, delivery_limit, ...).
    #[arg(long)]
    reason: Option<String>,
    /// Only the letter with this message id (repeat for several).
    #[arg(long = "id")]
    ids: Vec<String>,
    /// Only letters dead-lettered longer ago than this, e.g. 7d, 12h.
    #[arg(long, value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
}

impl Select {
    fn filter(self, limit: Option<usize>) -> Filter {
        Filter {
            event: self.event,
            handler: self.handler,
            reason: self.reason,
            ids: self.ids,
            older_than: self.older_than,
            limit,
        }
    }
}

pub(super) async fn command(settings: &Settings, action: DlqAction, out: &Out) -> CliResult {
    let queue = settings.dead_letter_queue();
    match action {
        DlqAction::List { select, limit } => {
            let filter = select.filter(Some(limit));
            let total = dlq::count(settings).await?;
            let letters = dlq::select(settings, &filter).await?;
            let shown = if filter.is_selective() {
                format!("{} matching {}", letters.len(), filter.describe())
            } else {
                letters.len().to_string()
            };
            out.text(&format!("{shown} of {total} dead letters in {queue}\n"))?;
            if !letters.is_empty() {
                out.text(&dlq::render_table(&letters))?;
            }
            out.json(&serde_json::json!({
                "queue": queue,
                "total": total,
                "letters": letters.iter().map(dlq::to_json).collect::<Vec<_>>(),
            }))
        }
        DlqAction::Show { id } => match dlq::show(settings, &id).await? {
            Some(letter) => out.either(&dlq::render_detail(&letter), &dlq::to_json(&letter)),
            None => Err(CliError::NothingMatched(format!(
                "no dead letter with message id {id:?} in {queue}; `burrow dlq list` shows the ids"
            ))),
        },
        DlqAction::Export {
            select,
            limit,
            file,
        } => export(settings, select.filter(limit), file, out).await,
        DlqAction::Replay {
            select,
            limit,
            dry_run,
        } => replay(settings, select.filter(limit), dry_run, out).await,
        DlqAction::Purge {
            select,
            limit,
            dry_run,
            yes,
        } => purge(settings, select.filter(limit), dry_run, yes, out).await,
    }
}

/// A progress bar on stderr when it is a terminal (hidden otherwise), fed
/// by [`Progress`] reports.
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new(verb: &'static str) -> Self {
        let bar = indicatif::ProgressBar::with_draw_target(
            None,
            indicatif::ProgressDrawTarget::stderr_with_hz(4),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} looked at, {{msg}} {verb} ({{eta}} left)"
        )) {
            bar.set_style(style);
        }
        Self(bar)
    }

    fn update(&self, p: Progress) {
        self.0.set_length(p.total as u64);
        self.0.set_position(p.seen as u64);
        self.0.set_message(p.selected.to_string());
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn nothing_matched(queue: &str, filter: &Filter) -> CliError {
    CliError::NothingMatched(format!(
        "no dead letter in {queue} matches {}; `burrow dlq list` shows what is there",
        filter.describe()
    ))
}

async fn export(
    settings: &Settings,
    filter: Filter,
    file: Option<PathBuf>,
    out: &Out,
) -> CliResult {
    let queue = settings.dead_letter_queue();
    let mut sink = match &file {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map(std::io::BufWriter::new)
                .map_err(|e| {
                    CliError::Usage(format!(
                        "cannot create {} ({e}); name a file that does not exist yet",
                        path.display()
                    ))
                })?,
        ),
        None => None,
    };
    let mut failed: Option<CliError> = None;
    let progress = dlq::visit(settings, &filter, &mut |letter| {
        let line = format!("{}\n", dlq::to_json(letter));
        let written = match sink.as_mut() {
            Some(f) => f
                .write_all(crate::redact::redact(&line).as_bytes())
                .map_err(CliError::Output),
            None => write_stdout(&line),
        };
        match written {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        }
    })
    .await?;
    if let Some(e) = failed {
        return Err(e);
    }
    if let Some(mut f) = sink {
        f.flush().map_err(CliError::Output)?;
    }
    if progress.selected == 0 && filter.is_selective() {
        return Err(nothing_matched(&queue, &filter));
    }
    if let Some(path) = file {
        // The letters went to the file; stdout says where.
        out.either(
            &format!(
                "exported {} of {} dead letters in {queue} to {} (nothing removed)\n",
                progress.selected,
                progress.total,
                path.display()
            ),
            &serde_json::json!({ "exported": progress.selected, "file": path }),
        )?;
    }
    Ok(())
}

async fn replay(settings: &Settings, filter: Filter, dry_run: bool, out: &Out) -> CliResult {
    let queue = settings.dead_letter_queue();
    let app_queue = settings.app_queue();
    if dry_run {
        let letters = dlq::select(settings, &filter).await?;
        if letters.is_empty() && filter.is_selective() {
            return Err(nothing_matched(&queue, &filter));
        }
        out.text(&format!(
            "would replay {} dead letters from {queue} into {app_queue} (dry run: nothing changed)\n",
            letters.len()
        ))?;
        if !letters.is_empty() {
            out.text(&dlq::render_table(&letters))?;
        }
        return out.json(&serde_json::json!({
            "dry_run": true,
            "would_replay": letters.len(),
            "letters": letters.iter().map(dlq::to_json).collect::<Vec<_>>(),
        }));
    }
    let publisher = Publisher::connect(settings).await?;
    let bar = Bar::new("replayed");
    let result = dlq::replay(settings, &publisher, &filter, &mut |p| bar.update(p)).await;
    drop(bar);
    publisher.close().await;
    let report = result?;
    if report.replayed == 0 && filter.is_selective() {
        return Err(nothing_matched(&queue, &filter));
    }
    out.either(
        &format!(
            "replayed {} into {app_queue} (confirmed); {} left in {queue}\n",
            report.replayed, report.left
        ),
        &serde_json::json!({
            "replayed": report.replayed,
            "skipped": report.skipped,
            "left": report.left,
            "into": app_queue,
            "queue": queue,
        }),
    )
}

async fn purge(
    settings: &Settings,
    filter: Filter,
    dry_run: bool,
    yes: bool,
    out: &Out,
) -> CliResult {
    let queue = settings.dead_letter_queue();
    if dry_run || !yes {
        // Count what would go: every ready letter, or the selected ones.
        let (would, letters) = if filter.is_selective() || filter.limit.is_some() {
            let letters = dlq::select(settings, &filter).await?;
            (letters.len(), letters)
        } else {
            (dlq::count(settings).await? as usize, Vec::new())
        };
        if would == 0 && filter.is_selective() {
            return Err(nothing_matched(&queue, &filter));
        }
        if !dry_run {
            return Err(CliError::Usage(format!(
                "purging deletes {would} dead letters in {queue} for good ({}); add --yes to confirm, \
                 --dry-run to see them, or `burrow dlq export` first to keep a copy",
                filter.describe()
            )));
        }
        out.text(&format!(
            "would purge {would} dead letters from {queue} (dry run: nothing changed)\n"
        ))?;
        if !letters.is_empty() {
            out.text(&dlq::render_table(&letters))?;
        }
        return out.json(&serde_json::json!({
            "dry_run": true,
            "would_purge": would,
            "letters": letters.iter().map(dlq::to_json).collect::<Vec<_>>(),
        }));
    }
    let bar = Bar::new("purged");
    let result = dlq::purge(settings, &filter, &mut |p| bar.update(p)).await;
    drop(bar);
    let report = result?;
    if report.purged == 0 && filter.is_selective() {
        return Err(nothing_matched(&queue, &filter));
    }
    out.either(
        &format!("purged {} dead letters from {queue}\n", report.purged),
        &serde_json::json!({ "purged": report.purged, "left": report.left, "queue": queue }),
    )
}

//! The dead-letter pages and actions. Every action goes through
//! [`crate::dlq`], the code behind `burrow dlq`: a replay is confirmed
//! before its letter is acked, a purge never takes more than it was told.

use std::{ops::ControlFlow, time::Duration};

use axum::{
    body::Body,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use maud::{Markup, html};

use super::{
    Form, Shared,
    auth::Operator,
    error_page,
    extract::{Read, Write},
    pages,
};
use crate::{
    dlq::{self, DeadLetter, Filter},
    wire,
};

/// Letters per page unless `size=` says otherwise, and the most it may say.
const PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 500;

/// The reasons burrow dead-letters for, and the broker's own, for the
/// filter's choices.
fn reasons() -> Vec<String> {
    let mut all: Vec<String> = wire::DeadReason::ALL
        .iter()
        .map(|r| r.as_str().to_owned())
        .collect();
    all.push("delivery_limit".into());
    all
}

/// The filter in `form` (`event`, `handler`, `reason`, `older_than`,
/// `ids`), or a sentence saying which field is wrong.
fn filter_of(form: &Form) -> Result<Filter, String> {
    let older_than = form
        .get("older_than")
        .map(|text| {
            humantime::parse_duration(text).map_err(|e| {
                format!("older than = {text:?} is not a duration ({e}); write e.g. 30m, 2h or 1d")
            })
        })
        .transpose()?;
    Ok(Filter {
        event: form.get("event").map(str::to_owned),
        handler: form.get("handler").map(str::to_owned),
        reason: form.get("reason").map(str::to_owned),
        ids: form.all("ids"),
        older_than,
        limit: None,
    })
}

fn bad_request(console: &Shared, text: &str) -> Response {
    error_page(console, StatusCode::BAD_REQUEST, "Cannot do that", text)
}

fn broker_error(console: &Shared, e: &crate::Error) -> Response {
    error_page(
        console,
        StatusCode::BAD_GATEWAY,
        "The broker refused",
        &e.to_string(),
    )
}

fn page_of(console: &Shared, operator: &Operator, title: &str, body: Markup) -> Response {
    (
        StatusCode::OK,
        pages::layout(console.app(), title, Some(operator), body),
    )
        .into_response()
}

/// `GET /console/letters`: the filter form, a page of the table, the
/// actions on the selection and on the filter.
pub(super) async fn list(
    State(console): State<Shared>,
    Read {
        operator,
        query: form,
    }: Read,
) -> Response {
    let filter = match filter_of(&form) {
        Ok(f) => f,
        Err(e) => return bad_request(&console, &e),
    };
    let size = form
        .get("size")
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(PAGE_SIZE)
        .clamp(1, MAX_PAGE_SIZE);
    let page = form
        .get("page")
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let skip = (page - 1) * size;
    // One letter past the page says whether a next page exists; browsing
    // stops there, so page 1 of a queue of 100k takes 51 letters, not 100k.
    let browse = Filter {
        limit: Some(skip + size + 1),
        ..filter.clone()
    };
    let mut shown = Vec::with_capacity(size);
    let mut index = 0usize;
    let progress = match dlq::visit(&console.0.settings, &browse, &mut |letter| {
        if index >= skip && shown.len() < size {
            shown.push(letter.clone());
        }
        index += 1;
        ControlFlow::Continue(())
    })
    .await
    {
        Ok(p) => p,
        Err(e) => return broker_error(&console, &e),
    };
    let more = index > skip + size;
    let now = wire::now_ms();
    let query = pages::filter_query(&filter);
    let link = |p: usize| format!("/console/letters?{query}&page={p}&size={size}");
    let scanned_all = progress.seen >= progress.total;
    let body = html! {
        (filter_form(&filter, size))
        p.meta id="counts" {
            (progress.total) " letters in " span.mono { (console.0.settings.dead_letter_queue()) } ". "
            @if shown.is_empty() {
                "None matches on this page."
            } @else {
                "Showing " (skip + 1) "–" (skip + shown.len())
                @if scanned_all && !more { " of " (index) " matching." }
                @else { " of the matching letters (browsed " (progress.seen) " so far)." }
            }
        }
        form method="post" action="/console/letters/replay" id="selection" {
            (pages::csrf_field(&operator))
            input type="hidden" name="scope" value="selected";
            table id="letters" {
                thead { tr {
                    th { input type="checkbox" data-select-all aria-label="select every letter on this page"; }
                    th { "event" } th { "reason" } th { "failed handler" } th { "last error" }
                    th.num { "attempts" } th { "first failure" } th { "age" } th { "id" }
                } }
                tbody {
                    @for l in &shown { (row(l, now)) }
                }
            }
            div.actions {
                button type="submit" id="replay-selected" { "Replay selected" }
                button.secondary type="submit" formaction="/console/letters/export" id="export-selected" { "Export selected" }
            }
        }
        div.pager {
            @if page > 1 { a href=(link(page - 1)) rel="prev" { "← previous" } }
            span.meta { "page " (page) }
            @if more { a href=(link(page + 1)) rel="next" { "next →" } }
        }
        h2 { "Everything matching the filter (" (filter.describe()) ")" }
        div.actions {
            form.inline method="post" action="/console/letters/replay" {
                (pages::csrf_field(&operator))
                input type="hidden" name="scope" value="filter";
                (pages::filter_fields(&filter))
                button type="submit" id="replay-filter" { "Replay all matching" }
            }
            a href={ "/console/letters/export?" (query) } { "Export all matching (JSON lines)" }
            a href={ "/console/letters/purge?" (query) } id="purge-link" { "Purge matching…" }
        }
    };
    page_of(&console, &operator, "Dead letters", body)
}

fn filter_form(filter: &Filter, size: usize) -> Markup {
    html! {
        form.filters method="get" action="/console/letters" id="filters" {
            label { "event (topic pattern)" input name="event" value=[filter.event.as_deref()] placeholder="Card*Event or #"; }
            label { "handler" input name="handler" value=[filter.handler.as_deref()]; }
            label { "reason"
                select name="reason" {
                    option value="" { "any" }
                    @for r in reasons() {
                        option value=(r) selected[filter.reason.as_deref() == Some(r.as_str())] { (r) }
                    }
                }
            }
            label { "older than" input name="older_than" placeholder="e.g. 1h"
                value=[filter.older_than.map(|d| humantime::format_duration(d).to_string())]; }
            input type="hidden" name="size" value=(size);
            button type="submit" { "Filter" }
            a href="/console/letters" { "clear" }
        }
    }
}

fn row(l: &DeadLetter, now: i64) -> Markup {
    let age = l
        .age(now)
        .map(|a| humantime::format_duration(Duration::from_secs(a.as_secs())).to_string());
    let first = l
        .first_failure_at_ms
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string());
    let error = l.last_error.as_deref().unwrap_or("");
    let error_short: String = error
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(120)
        .collect();
    html! {
        tr data-id=(l.message_id) {
            td { input type="checkbox" name="ids" value=(l.message_id) aria-label={ "select " (l.message_id) }; }
            td.mono { (pages::or_dash(&l.event_type)) }
            td { (pages::or_dash(l.reason.as_deref().unwrap_or(""))) }
            td.mono { (pages::or_dash(l.failed_handler.as_deref().unwrap_or(""))) }
            td.error title=(error) { (pages::or_dash(&error_short)) }
            td.num { (l.attempts.map_or("–".to_owned(), |n| n.to_string())) }
            td { (pages::or_dash(first.as_deref().unwrap_or(""))) }
            td { (pages::or_dash(age.as_deref().unwrap_or(""))) }
            td.mono { a href={ "/console/letters/" (urlencode(&l.message_id)) } { (l.message_id) } }
        }
    }
}

fn urlencode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// `GET /console/letters/{id}`: one letter in full.
pub(super) async fn detail(
    State(console): State<Shared>,
    Path(id): Path<String>,
    Read { operator, .. }: Read,
) -> Response {
    let letter = match dlq::show(&console.0.settings, &id).await {
        Ok(Some(letter)) => letter,
        Ok(None) => {
            return error_page(
                &console,
                StatusCode::NOT_FOUND,
                "No such letter",
                &format!("No dead letter has the id {id:?}; it may have been replayed or purged."),
            );
        }
        Err(e) => return broker_error(&console, &e),
    };
    let json = dlq::to_json(&letter);
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let time = |ms: Option<i64>| {
        ms.and_then(chrono::DateTime::from_timestamp_millis)
            .map_or("–".to_owned(), |t| {
                t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string()
            })
    };
    let body = html! {
        (pages::facts(&[
            ("message id", letter.message_id.clone()),
            ("event", letter.event_type.clone()),
            ("routing key", letter.routing_key.clone()),
        ]))
        h2 { "Failure" }
        (pages::facts(&[
            ("reason", letter.reason.clone().unwrap_or_default()),
            ("failed handler", letter.failed_handler.clone().unwrap_or_default()),
            ("handlers to run", if letter.handlers.is_empty() {
                "none recorded: a replay runs every subscribed handler".to_owned()
            } else { letter.handlers.join(", ") }),
            ("attempts", letter.attempts.map_or(String::new(), |n| n.to_string())),
            ("replays", letter.replays.to_string()),
            ("first failure", time(letter.first_failure_at_ms)),
            ("dead-lettered", time(letter.dead_at_ms)),
        ]))
        h2 { "Last error" }
        pre.body id="last-error" { (letter.last_error.as_deref().unwrap_or("none recorded")) }
        div.actions {
            form.inline method="post" action="/console/letters/replay" {
                (pages::csrf_field(&operator))
                input type="hidden" name="scope" value="selected";
                input type="hidden" name="ids" value=(letter.message_id);
                button type="submit" id="replay-one" { "Replay this letter" }
            }
            a href={ "/console/letters/export?ids=" (urlencode(&letter.message_id)) } { "Export (JSON)" }
            a href="/console/letters" { "Back to the list" }
        }
        h2 { "Body" }
        (pages::body_view(&letter.body))
        h2 { "Properties" }
        pre.json { (pretty(&json["properties"])) }
        h2 { "Headers (with the broker's x-death history)" }
        pre.json id="headers" { (pretty(&json["headers"])) }
    };
    page_of(&console, &operator, "Dead letter", body)
}

/// `GET /console/letters/export?<filter>`: the filter (or `ids=`) as JSON
/// lines, one [`dlq::to_json`] document each, as `burrow dlq export`.
pub(super) async fn export(
    State(console): State<Shared>,
    Read {
        operator,
        query: form,
    }: Read,
) -> Response {
    export_letters(&console, &operator, &form).await
}

/// `POST /console/letters/export`: the table's ticked letters (a form, so
/// that its CSRF token never lands in a URL).
pub(super) async fn export_selected(
    State(console): State<Shared>,
    Write { operator, form }: Write,
) -> Response {
    if form.all("ids").is_empty() {
        return bad_request(&console, "No letter is selected: tick at least one box.");
    }
    export_letters(&console, &operator, &form).await
}

async fn export_letters(console: &Shared, operator: &Operator, form: &Form) -> Response {
    let console = console.clone();
    let filter = match filter_of(form) {
        Ok(f) => f,
        Err(e) => return bad_request(&console, &e),
    };
    let mut out = String::new();
    let mut exported = 0usize;
    let result = dlq::visit(&console.0.settings, &filter, &mut |letter| {
        out.push_str(&dlq::to_json(letter).to_string());
        out.push('\n');
        exported += 1;
        ControlFlow::Continue(())
    })
    .await;
    if let Err(e) = result {
        return broker_error(&console, &e);
    }
    tracing::info!(
        target: "burrow::console",
        operator = %operator.who,
        action = "export",
        filter = %filter.describe(),
        exported,
        "console: exported dead letters"
    );
    let name = format!(
        "attachment; filename=\"{}-dead-letters.jsonl\"",
        console.0.settings.app.name
    );
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_owned()),
            (header::CONTENT_DISPOSITION, name),
        ],
        Body::from(out),
    )
        .into_response()
}

/// `POST /console/letters/replay`: `scope=selected` replays the checked
/// `ids`; `scope=filter` replays everything the filter matches.
pub(super) async fn replay(
    State(console): State<Shared>,
    Write { operator, form }: Write,
) -> Response {
    let filter = match (form.get("scope"), filter_of(&form)) {
        (_, Err(e)) => return bad_request(&console, &e),
        (Some("selected"), Ok(f)) if f.ids.is_empty() => {
            return bad_request(&console, "No letter is selected: tick at least one box.");
        }
        (Some("selected") | Some("filter"), Ok(f)) => f,
        (other, _) => {
            return bad_request(
                &console,
                &format!("scope = {other:?} is not an action; use \"selected\" or \"filter\""),
            );
        }
    };
    let result = dlq::replay(
        &console.0.settings,
        &console.0.publisher,
        &filter,
        &mut |_| {},
    )
    .await;
    let (kind, text) = match &result {
        Ok(report) => (
            "ok",
            format!(
                "Replayed {} letter{} to {} (each confirmed by the broker before it left the \
                 dead-letter queue); {} left there.",
                report.replayed,
                if report.replayed == 1 { "" } else { "s" },
                console.0.settings.app_queue(),
                report.left
            ),
        ),
        Err(e) => (
            "error",
            format!("The replay stopped: {e}. Letters replayed before the error stay replayed."),
        ),
    };
    tracing::info!(
        target: "burrow::console",
        operator = %operator.who,
        action = "replay",
        filter = %filter.describe(),
        replayed = result.as_ref().map_or(0, |r| r.replayed),
        error = result.as_ref().err().map(tracing::field::display),
        "console: replayed dead letters"
    );
    let body = html! {
        div id="result" { (pages::notice(kind, &text)) }
        p { a href="/console/letters" { "Back to the dead letters" } }
    };
    page_of(&console, &operator, "Replay", body)
}

/// `GET /console/letters/purge`: how many letters the filter takes, and the
/// form that asks for that number typed out.
pub(super) async fn purge_form(
    State(console): State<Shared>,
    Read {
        operator,
        query: form,
    }: Read,
) -> Response {
    let filter = match filter_of(&form) {
        Ok(f) => f,
        Err(e) => return bad_request(&console, &e),
    };
    let counted = if filter.is_selective() {
        dlq::visit(&console.0.settings, &filter, &mut |_| {
            ControlFlow::Continue(())
        })
        .await
        .map(|p| p.selected)
    } else {
        dlq::count(&console.0.settings).await.map(|n| n as usize)
    };
    let count = match counted {
        Ok(n) => n,
        Err(e) => return broker_error(&console, &e),
    };
    let body = html! {
        @if count == 0 {
            (pages::notice("ok", "No letter matches; nothing to purge."))
        } @else {
            (pages::notice("warn", &format!(
                "Purging deletes {count} dead letter{} ({}) for good. Export them first if you may need them.",
                if count == 1 { "" } else { "s" }, filter.describe())))
            form.filters method="post" action="/console/letters/purge" id="purge" {
                (pages::csrf_field(&operator))
                (pages::filter_fields(&filter))
                input type="hidden" name="expected" value=(count);
                label { "Type " strong { (count) } " to confirm"
                    input name="confirm" autocomplete="off" inputmode="numeric"; }
                button.danger type="submit" id="purge-confirm" { "Purge " (count) " letters" }
            }
        }
        p { a href="/console/letters" { "Back to the dead letters" } }
    };
    page_of(&console, &operator, "Purge dead letters", body)
}

/// `POST /console/letters/purge`: purges at most `expected` letters of the
/// filter, and only when `confirm` repeats that number.
pub(super) async fn purge(
    State(console): State<Shared>,
    Write { operator, form }: Write,
) -> Response {
    let mut filter = match filter_of(&form) {
        Ok(f) => f,
        Err(e) => return bad_request(&console, &e),
    };
    let Some(expected) = form.get("expected").and_then(|n| n.parse::<usize>().ok()) else {
        return bad_request(&console, "The purge form lost its count; open it again.");
    };
    if form.get("confirm") != Some(expected.to_string().as_str()) {
        return bad_request(
            &console,
            &format!(
                "You typed {:?}; type {expected} (the number of letters) to confirm the purge.",
                form.get("confirm").unwrap_or("")
            ),
        );
    }
    // Never more than the person confirmed, even if letters arrived since.
    filter.limit = Some(expected);
    let result = dlq::purge(&console.0.settings, &filter, &mut |_| {}).await;
    tracing::info!(
        target: "burrow::console",
        operator = %operator.who,
        action = "purge",
        filter = %filter.describe(),
        confirmed = expected,
        purged = result.as_ref().map_or(0, |r| r.purged),
        error = result.as_ref().err().map(tracing::field::display),
        "console: purged dead letters"
    );
    let (kind, text) = match &result {
        Ok(r) => (
            "ok",
            format!(
                "Purged {} letter{}; {} left in the dead-letter queue.",
                r.purged,
                if r.purged == 1 { "" } else { "s" },
                r.left
            ),
        ),
        Err(e) => ("error", format!("The purge stopped: {e}")),
    };
    let body = html! {
        div id="result" { (pages::notice(kind, &text)) }
        p { a href="/console/letters" { "Back to the dead letters" } }
    };
    page_of(&console, &operator, "Purge", body)
}

//! The `burrow` binary run as operators run it: configured through its
//! environment, its output read to the end or logged to a file, its HTTP
//! endpoint probed and its `/metrics` text read.

use std::{future::Future, net::SocketAddr, path::Path, process::Stdio};

use burrow::Settings;
use tokio::process::{Child, Command};

use super::{eventually, within};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_burrow");

/// The environment `burrow` runs with. `RUST_LOG` is removed from the
/// inherited environment unless set with [`Burrow::with`].
#[derive(Clone, Debug)]
pub struct Burrow {
    env: Vec<(String, String)>,
    removed: Vec<&'static str>,
}

impl Burrow {
    /// `settings`' app name, exchange and HTTP address (when it has one),
    /// the repository's config directory, and the broker at `amqp_url`.
    pub fn new(settings: &Settings, amqp_url: &str) -> Self {
        let mut burrow = Self {
            env: Vec::new(),
            removed: vec!["RUST_LOG"],
        }
        .with("BURROW__AMQP__URL", amqp_url)
        .with("BURROW__APP__NAME", &settings.app.name)
        .with("BURROW__AMQP__EXCHANGE", &settings.amqp.exchange)
        .with(
            "BURROW_CONFIG_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config"),
        )
        // The same retry steps as `settings`, so the test's Cleanup deletes
        // the queues the binary declares.
        .with(
            "BURROW__RETRY__DELAYS",
            &settings
                .retry
                .delays
                .iter()
                .map(|d| humantime::format_duration(*d).to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
        if let Some(http) = settings.http.addr {
            burrow = burrow.with("BURROW__HTTP__ADDR", &http.to_string());
        }
        burrow
    }

    /// Sets `key` (the last setting of a key wins).
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.set(key, value);
        self
    }

    /// Sets `key` in place (the last setting of a key wins).
    pub fn set(&mut self, key: &str, value: &str) {
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Removes `key` from the environment the tests inherit.
    pub fn without(mut self, key: &'static str) -> Self {
        self.removed.push(key);
        self
    }

    /// `burrow <args>` with this environment and no stdin, killed when dropped.
    pub fn command(&self, args: &[&str]) -> Command {
        self.command_of(Path::new(BIN), args)
    }

    /// Another program built on burrow's command line (an example), with
    /// this environment.
    pub fn command_of(&self, program: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(program);
        for key in &self.removed {
            command.env_remove(key);
        }
        command
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Runs `burrow <args>` to the end: (exit code, stdout + stderr).
    pub async fn run(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = within(&format!("burrow {args:?}"), self.command(args).output())
            .await
            .expect("burrow runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    /// Spawns `burrow <args>` with stdout and stderr going to `log` (a pipe
    /// nobody reads while the process runs could fill up and block it).
    /// Killed when dropped.
    pub fn spawn(&self, args: &[&str], log: &Path) -> Child {
        let file = std::fs::File::create(log).expect("log file");
        self.command(args)
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("burrow starts")
    }
}

/// Sends SIGTERM to `child`.
pub fn sigterm(child: &Child) {
    let pid = child.id().expect("the child runs") as i32;
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0, "SIGTERM to burrow");
}

/// `GET path`: the status code and body (0 when nothing answers).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    match burrow::http::probe(addr, path).await {
        Ok(body) => (200, body),
        Err(e) => {
            let text = e.to_string();
            let code = text
                .split("HTTP/1.")
                .nth(1)
                .and_then(|s| s.get(2..5))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            (code, text)
        }
    }
}

/// Polls `get` (a `GET path`) until it answers `code`, for at most
/// [`WAIT`](super::WAIT); returns the body.
pub async fn wait_status<F, Fut>(path: &str, code: u16, mut get: F) -> String
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (u16, String)>,
{
    eventually(&format!("{path} to answer {code}"), || {
        let answer = get();
        async move {
            match answer.await {
                (got, body) if got == code => Ok(body),
                (got, body) => Err(format!("{got}: {body}")),
            }
        }
    })
    .await
}

/// Whether `text` has a sample of `name` whose labels are exactly `labels`
/// (in any order), whatever its value.
pub fn has_series(text: &str, name: &str, labels: &[(&str, &str)]) -> bool {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    text.lines().any(|line| {
        let Some(rest) = line.strip_prefix(name) else {
            return false;
        };
        let got = match rest.strip_prefix('{') {
            Some(inner) => match inner.split_once('}') {
                Some((labels, _)) => labels,
                None => return false,
            },
            None if rest.starts_with(' ') => "",
            None => return false,
        };
        let mut got: Vec<String> = if got.is_empty() {
            Vec::new()
        } else {
            got.split(',').map(str::to_owned).collect()
        };
        got.sort();
        got == want
    })
}

/// Sums the samples of `name` whose labels include every pair of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|line| {
            line.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("unparsable sample: {line}"))
        })
        .sum()
}

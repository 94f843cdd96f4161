//! The accounting: a ledger of handler executions that survives SIGKILL.
//!
//! The worker child appends one line per handler execution to a file opened
//! with `O_APPEND`, in a single `write(2)`, before the handler returns:
//!
//! ```text
//! <unix ms> <message id> <attempt> <ok|fail|panic|hang> <pid>
//! ```
//!
//! and `<unix ms> - 0 consuming <pid>` each time the worker starts consuming.
//!
//! A line reaches the page cache as soon as `write` returns, so it outlives
//! the process (not the machine: no fsync, the faults here kill processes
//! and brokers, never the kernel). `O_APPEND` makes each line land whole
//! even with many handler tasks writing at once.
//!
//! The parent reads the ledger incrementally and compares it with the ids the
//! broker confirmed and, for messages that must end dead-lettered, with what
//! is in the dead-letter queue.

use std::{
    collections::{HashMap, HashSet},
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

/// The writing side, used by the worker child's handler.
#[derive(Debug, Clone)]
pub struct LedgerWriter {
    file: Arc<File>,
}

impl LedgerWriter {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            file: Arc::new(file),
        })
    }

    /// Appends one execution line in one write.
    pub fn record(&self, message_id: &str, attempt: u32, outcome: &str) {
        let line = format!(
            "{} {message_id} {attempt} {outcome} {}\n",
            now_ms(),
            std::process::id()
        );
        let written = (&*self.file)
            .write(line.as_bytes())
            .expect("append to the ledger");
        assert_eq!(written, line.len(), "a ledger line was written in part");
    }
}

/// One recorded handler execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    pub at_ms: i64,
    pub attempt: u32,
    pub outcome: String,
    pub pid: u32,
}

/// The reading side, used by the test: follows the file as it grows.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    offset: u64,
    partial: String,
    executions: HashMap<String, Vec<Execution>>,
    /// Ids with at least one `ok` line.
    handled: HashSet<String>,
    /// `(pid, unix ms)` of each time a worker started consuming.
    consuming: Vec<(u32, i64)>,
}

impl Ledger {
    /// Creates the (empty) ledger file at `path`.
    pub fn create(path: &Path) -> Self {
        File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Self {
            path: path.to_owned(),
            offset: 0,
            partial: String::new(),
            executions: HashMap::new(),
            handled: HashSet::new(),
            consuming: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the lines appended since the last call.
    pub fn refresh(&mut self) {
        let mut file =
            File::open(&self.path).unwrap_or_else(|e| panic!("open {}: {e}", self.path.display()));
        file.seek(SeekFrom::Start(self.offset)).expect("seek");
        let mut fresh = String::new();
        let n = file.read_to_string(&mut fresh).expect("read the ledger");
        self.offset += n as u64;
        self.partial.push_str(&fresh);
        // Only complete lines; a line being written stays for the next call.
        let Some(end) = self.partial.rfind('\n') else {
            return;
        };
        let complete: String = self.partial.drain(..=end).collect();
        for line in complete.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            let [at, id, attempt, outcome, pid] = parts[..] else {
                panic!("malformed ledger line {line:?}");
            };
            let execution = Execution {
                at_ms: at.parse().expect("ledger time"),
                attempt: attempt.parse().expect("ledger attempt"),
                outcome: outcome.to_owned(),
                pid: pid.parse().expect("ledger pid"),
            };
            if id == "-" {
                self.consuming.push((execution.pid, execution.at_ms));
                continue;
            }
            if execution.outcome == "ok" {
                self.handled.insert(id.to_owned());
            }
            self.executions
                .entry(id.to_owned())
                .or_default()
                .push(execution);
        }
    }

    /// When the worker process `pid` first started consuming.
    pub fn consuming_since(&self, pid: u32) -> Option<i64> {
        self.consuming
            .iter()
            .find(|(p, _)| *p == pid)
            .map(|(_, at)| *at)
    }

    /// Ids handled successfully at least once.
    pub fn handled(&self) -> &HashSet<String> {
        &self.handled
    }

    pub fn executions(&self, id: &str) -> &[Execution] {
        self.executions.get(id).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Successful executions of `id`.
    pub fn successes(&self, id: &str) -> usize {
        self.executions(id)
            .iter()
            .filter(|e| e.outcome == "ok")
            .count()
    }

    /// The longest stall in `[since_ms, until_ms)`: the largest of the wait
    /// for the first success after `since_ms` and every gap between
    /// successive successes before `until_ms` (the next fault, if any).
    pub fn stall_between(&self, since_ms: i64, until_ms: Option<i64>) -> Option<i64> {
        let until = until_ms.unwrap_or(i64::MAX);
        let mut times: Vec<i64> = self
            .executions
            .values()
            .flatten()
            .filter(|e| e.outcome == "ok" && e.at_ms >= since_ms && e.at_ms < until)
            .map(|e| e.at_ms)
            .collect();
        times.sort_unstable();
        let first = *times.first()?;
        let gaps = times.windows(2).map(|w| w[1] - w[0]);
        Some(gaps.fold(first - since_ms, i64::max))
    }

    /// The last successful execution of any id.
    pub fn last_success(&self) -> Option<i64> {
        self.executions
            .values()
            .flatten()
            .filter(|e| e.outcome == "ok")
            .map(|e| e.at_ms)
            .max()
    }
}

/// Current Unix time in milliseconds (the ledger's clock, shared by the
/// parent and the child: same machine).
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

//! A RabbitMQ node of the test's own, for tests that stop, kill or
//! reconfigure a broker. The shared broker the other tests use is never
//! touched.
//!
//! Each [`Node`] is one `rabbitmq-server` process with its own node name,
//! AMQP and distribution ports, data directory, logs, configuration, empty
//! plugin list and Erlang cookie, all under `target/test-nodes/<name>`. It
//! registers with the machine's epmd like any node.
//!
//! Nodes are never leaked:
//! - [`Drop`] kills the node's process group and removes its directory, also
//!   when the test panicked;
//! - the node runs under a small `sh` watchdog whose stdin is a pipe from the
//!   test process: when the test process dies without running `Drop`
//!   (SIGKILL, abort), the pipe closes and the watchdog kills the group;
//! - the first node of a test process removes directories (and any surviving
//!   processes) that belonged to test processes that no longer exist.
//!
//! The RabbitMQ scripts are found in `RABBITMQ_SCRIPTS_DIR`, else
//! `/usr/lib/rabbitmq/bin` (the Debian package; its `/usr/sbin` wrappers
//! switch to the `rabbitmq` user when run as root), else on `PATH`.
//!
//! Another RabbitMQ: with `BURROW_TEST_RABBITMQ_ROOT` set to a Debian root
//! with the `rabbitmq-server` package (the RabbitMQ 4.0 root that
//! `scripts/ensure-rabbitmq4.sh` builds; `bash scripts/ensure-rabbitmq4.sh
//! root` prints its path), every node and every CLI call runs in that root
//! (chroot), with its Erlang and its `/usr/lib/rabbitmq/bin` scripts, and
//! registers with the root's epmd on [`ROOT_EPMD_PORT`] instead of the
//! machine's. The node directories and the temporary folder (where tests
//! write files a node reads, such as TLS certificates) are bind-mounted into
//! the root at their own paths, so every path means the same inside and out.
//! Without the variable nothing of this happens.
//!
//! A fresh node takes about 5 s to start on an idle 2-core machine, so tests
//! share one node where they can.

use std::{
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::{Once, OnceLock},
    time::{Duration, Instant},
};

/// Upper bound for a node to start (or restart) and for one CLI command.
pub const NODE_WAIT: Duration = Duration::from_secs(90);

/// A free loopback TCP port (bound and released at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral loopback port")
        .port()
}

/// Where the nodes live: `$CARGO_TARGET_DIR/test-nodes`, or `target/test-nodes`.
pub fn nodes_root() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let target = if target.is_relative() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(target)
    } else {
        target
    };
    target.join("test-nodes")
}

fn scripts_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RABBITMQ_SCRIPTS_DIR") {
        return PathBuf::from(dir);
    }
    let debian = Path::new("/usr/lib/rabbitmq/bin");
    if debian.join("rabbitmq-server").exists() {
        return debian.to_owned();
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path).find(|dir| dir.join("rabbitmq-server").exists())
        })
        .expect("rabbitmq-server not found: install RabbitMQ or set RABBITMQ_SCRIPTS_DIR")
}

/// The epmd port of the nodes in a `BURROW_TEST_RABBITMQ_ROOT`: the one
/// `scripts/ensure-rabbitmq4.sh` gives the root's node. The machine's epmd
/// (4369) belongs to the machine's RabbitMQ, another Erlang release.
pub const ROOT_EPMD_PORT: u16 = 4370;

/// Where the RabbitMQ scripts are inside a `BURROW_TEST_RABBITMQ_ROOT`.
const ROOT_SCRIPTS_DIR: &str = "/usr/lib/rabbitmq/bin";

/// `BURROW_TEST_RABBITMQ_ROOT`, ready for nodes (see the module docs), or
/// `None` when unset. Panics, saying what to do, when the root is unusable.
pub fn rabbitmq_root() -> Option<&'static Path> {
    static ROOT: OnceLock<Option<PathBuf>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = std::env::var_os("BURROW_TEST_RABBITMQ_ROOT").filter(|v| !v.is_empty())?;
        let root = PathBuf::from(root);
        assert!(
            root.join(ROOT_SCRIPTS_DIR.trim_start_matches('/'))
                .join("rabbitmq-server")
                .exists(),
            "BURROW_TEST_RABBITMQ_ROOT={} has no {ROOT_SCRIPTS_DIR}/rabbitmq-server: \
             build it with `sudo bash scripts/ensure-rabbitmq4.sh`",
            root.display()
        );
        let root = root
            .canonicalize()
            .unwrap_or_else(|e| panic!("BURROW_TEST_RABBITMQ_ROOT={}: {e}", root.display()));
        prepare_root(&root);
        Some(root)
    })
    .as_deref()
}

/// Mounts what the nodes need in `root` (idempotent, also across test
/// processes): `/proc`, which Erlang reads; the node directories and the
/// temporary folder at their own paths; and starts the root's epmd.
fn prepare_root(root: &Path) {
    if !root.join("proc/self").exists() {
        run_ok(
            Command::new("mount")
                .args(["-t", "proc", "proc"])
                .arg(root.join("proc")),
        );
    }
    let nodes = nodes_root();
    std::fs::create_dir_all(&nodes).expect("create the test-nodes folder");
    let temp = std::env::temp_dir();
    // The temporary folder first: when it holds the node directories, its
    // mount already shows them.
    for dir in [temp, nodes].into_iter().filter(|d| d.is_absolute()) {
        bind_into_root(root, &dir);
    }
    // The root's epmd, started from the root's `/`: an epmd that a node
    // started would keep running in that node's directory, where the sweep of
    // stale nodes would kill it. A second `-daemon` on a port in use exits.
    let mut epmd = Command::new("chroot");
    epmd.arg(root)
        .args(["/usr/bin/env", "-i"])
        .arg(format!("PATH={ROOT_PATH}"))
        .arg(format!("ERL_EPMD_PORT={ROOT_EPMD_PORT}"))
        .args(["ERL_EPMD_ADDRESS=127.0.0.1", "epmd", "-daemon"]);
    run_ok(&mut epmd);
}

/// `PATH` inside the root (the caller's may have none of the root's folders).
const ROOT_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// Bind-mounts `dir` at `root/dir`, unless it already shows there.
fn bind_into_root(root: &Path, dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let same = |a: &Path, b: &Path| match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    let inside = root.join(dir.strip_prefix("/").expect("an absolute path"));
    if same(dir, &inside) {
        return;
    }
    std::fs::create_dir_all(&inside)
        .unwrap_or_else(|e| panic!("create {} in the root: {e}", inside.display()));
    // A symbolic link of the root's (e.g. /var/run -> /run) on the way must
    // not lead the mount out of the root.
    let real = inside.canonicalize().expect("canonical mount point");
    assert!(
        real.starts_with(root),
        "{} leads out of the root (to {})",
        inside.display(),
        real.display()
    );
    // A mount of a folder since deleted and made again (cargo clean): drop it.
    let mounted = std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .any(|m| Path::new(m) == real)
    });
    if mounted {
        let _ = Command::new("umount").arg("-l").arg(&real).status();
    }
    run_ok(Command::new("mount").arg("--bind").arg(dir).arg(&real));
    assert!(
        same(dir, &inside),
        "{} does not show {} after mount --bind",
        inside.display(),
        dir.display()
    );
}

/// Runs `command`, panicking with its output unless it succeeds.
fn run_ok(command: &mut Command) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The command line that runs RabbitMQ's `tool` (`rabbitmq-server`,
/// `rabbitmqctl`, ...) in `dir`: the machine's, or in
/// `BURROW_TEST_RABBITMQ_ROOT` through chroot, in the same `dir` there.
fn tool_argv(tool: &str, dir: &Path) -> Vec<std::ffi::OsString> {
    match rabbitmq_root() {
        None => vec![scripts_dir().join(tool).into()],
        Some(root) => vec![
            "chroot".into(),
            root.into(),
            // chroot starts in the root's `/`; the sweep of stale nodes
            // finds a node's processes by their working directory.
            "/usr/bin/env".into(),
            "-C".into(),
            dir.into(),
            Path::new(ROOT_SCRIPTS_DIR).join(tool).into(),
        ],
    }
}

/// One `rabbitmq-server` process of the test's own.
#[derive(Debug)]
pub struct Node {
    name: String,
    amqp_port: u16,
    dist_port: u16,
    /// The management API's port, when the plugin is enabled.
    management_port: Option<u16>,
    dir: PathBuf,
    /// The watchdog `sh`, leader of the node's process group.
    watchdog: Option<Child>,
    /// Its stdin; closing it (here or by the test process dying) makes the
    /// watchdog kill the group.
    lifeline: Option<ChildStdin>,
}

impl Node {
    /// [`Node::start_with`] with no extra configuration.
    pub async fn start(prefix: &str) -> Node {
        Self::start_with(prefix, "").await
    }

    /// Starts a node and waits until it accepts AMQP connections.
    /// `extra_conf`: extra `rabbitmq.conf` lines (e.g. a TLS listener).
    pub async fn start_with(prefix: &str, extra_conf: &str) -> Node {
        Self::start_inner(prefix, extra_conf, &random_cookie(), false).await
    }

    /// Starts a node with the management plugin on a loopback port of its
    /// own ([`Node::management_url`]); returns once the plugin has started
    /// (`rabbitmqctl wait` waits for the plugins too).
    pub async fn start_with_management(prefix: &str) -> Node {
        Self::start_inner(prefix, "", &random_cookie(), true).await
    }

    async fn start_inner(prefix: &str, extra_conf: &str, cookie: &str, management: bool) -> Node {
        sweep_stale_nodes();
        // Mounts (once) what nodes in a BURROW_TEST_RABBITMQ_ROOT need.
        let _ = rabbitmq_root();
        // A port may be taken between free_port() and the node binding it:
        // then start again with fresh ports.
        let mut last_error = String::new();
        for _ in 0..3 {
            let mut node = Node::create(prefix, extra_conf, cookie, management);
            match node.launch_and_wait().await {
                Ok(()) => return node,
                Err(e) => last_error = e,
            }
        }
        panic!("{last_error}");
    }

    fn create(prefix: &str, extra_conf: &str, cookie: &str, management: bool) -> Node {
        let short = format!(
            "burrow-{prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let dir = nodes_root().join(&short);
        std::fs::create_dir_all(dir.join("mnesia")).expect("create the node directory");
        std::fs::create_dir_all(dir.join("log")).expect("create the node log directory");
        write_file(&dir.join("owner"), &std::process::id().to_string());
        let management_port = management.then(free_port);
        let (plugins, extra_conf) = match management_port {
            Some(port) => (
                "[rabbitmq_management].\n",
                format!(
                    "{extra_conf}\nmanagement.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {port}"
                ),
            ),
            None => ("[].\n", extra_conf.to_owned()),
        };
        write_file(&dir.join("enabled_plugins"), plugins);
        // Keeps the system's /etc/rabbitmq/rabbitmq-env.conf (node name,
        // ports) out of our node.
        write_file(&dir.join("rabbitmq-env.conf"), "");
        write_file(&dir.join("rabbitmq.conf"), &format!("{extra_conf}\n"));
        let cookie_file = dir.join(".erlang.cookie");
        write_file(&cookie_file, cookie);
        set_mode(&cookie_file, 0o400);
        Node {
            name: format!("{short}@localhost"),
            amqp_port: free_port(),
            dist_port: free_port(),
            management_port,
            dir,
            watchdog: None,
            lifeline: None,
        }
    }

    /// The Erlang node name, e.g. `burrow-lifecycle-1a2b3c4d@localhost`.
    pub fn node_name(&self) -> &str {
        &self.name
    }

    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    /// The AMQP listener's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.amqp_port))
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// `http://guest:guest@127.0.0.1:<port>` of a node started with
    /// [`Node::start_with_management`].
    pub fn management_url(&self) -> String {
        let port = self
            .management_port
            .expect("the node was started with Node::start_with_management");
        format!("http://guest:guest@127.0.0.1:{port}")
    }

    /// The node's directory under `target/test-nodes/`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `rabbitmqctl -n <node> <args>`, bounded by [`NODE_WAIT`] (blocking).
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.cli().run("rabbitmqctl", args)
    }

    /// `rabbitmq-diagnostics -n <node> <args>`, bounded by [`NODE_WAIT`].
    pub fn diagnostics(&self, args: &[&str]) -> Output {
        self.cli().run("rabbitmq-diagnostics", args)
    }

    fn cli(&self) -> Cli {
        Cli {
            name: self.name.clone(),
            dir: self.dir.clone(),
        }
    }

    /// Like [`Node::ctl`], off the async runtime's threads, panicking
    /// unless it succeeds.
    pub async fn ctl_ok(&self, args: &[&str]) -> Output {
        let cli = self.cli();
        let owned: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let output = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = owned.iter().map(String::as_str).collect();
            cli.run("rabbitmqctl", &args)
        })
        .await
        .expect("rabbitmqctl task");
        assert!(
            output.status.success(),
            "rabbitmqctl -n {} {} failed ({}):\n{}{}",
            self.name,
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// `rabbitmqctl stop_app`: the Erlang node stays up, every AMQP
    /// connection is closed and the listener stops.
    pub async fn stop_app(&self) {
        self.ctl_ok(&["stop_app"]).await;
    }

    /// `rabbitmqctl start_app`, then waits until the node is fully booted.
    pub async fn start_app(&self) {
        self.ctl_ok(&["start_app"]).await;
        self.ctl_ok(&[
            "await_startup",
            "--timeout",
            &NODE_WAIT.as_secs().to_string(),
        ])
        .await;
        self.wait_amqp_port()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGKILLs the node (its whole process group) and waits until the
    /// Erlang VM is gone.
    pub async fn kill(&mut self) {
        let beam = self.beam_pid();
        self.kill_group();
        if let Some(pid) = beam {
            let deadline = Instant::now() + NODE_WAIT;
            while process_alive(pid) {
                assert!(
                    Instant::now() < deadline,
                    "node {} (pid {pid}) survived SIGKILL",
                    self.name
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Starts the node again with the same name, ports and data directory
    /// and waits until it is ready; stops it first (gracefully) if it runs.
    pub async fn restart(&mut self) {
        if self.beam_pid().is_some_and(process_alive) {
            let _ = self.ctl_ok(&["stop"]).await;
            self.kill().await;
        }
        self.kill_group();
        if let Err(e) = self.launch_and_wait().await {
            panic!("{e}");
        }
    }

    /// The OS pid of the node's Erlang VM, from its pid file.
    pub fn beam_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// The last `lines` lines of the node's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for file in [
            self.dir.join("stdout.log"),
            self.dir.join("log").join(format!("{}.log", self.name)),
        ] {
            if let Ok(text) = std::fs::read_to_string(&file) {
                let all: Vec<&str> = text.lines().collect();
                let from = all.len().saturating_sub(lines);
                out.push_str(&format!("--- {}\n", file.display()));
                out.push_str(&all[from..].join("\n"));
                out.push('\n');
            }
        }
        out
    }

    /// Spawns the watchdog and the node under it.
    fn launch(&mut self) {
        let dir = &self.dir;
        let _ = std::fs::remove_file(dir.join("pid"));
        // $1: our directory (so that the sweep can also recognise the group
        // leader by its command line), then the server's command line.
        let script = r#"cd "$1" || exit 1
dir=$1
shift
"$@" >>"$dir/stdout.log" 2>&1 </dev/null &
cat >/dev/null
kill -KILL 0"#;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .arg("burrow-test-node")
            .arg(dir)
            .args(tool_argv("rabbitmq-server", dir))
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            );
        node_env(&self.dir, &mut command);
        command.env("RABBITMQ_NODENAME", &self.name);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().expect("spawn rabbitmq-server");
        self.lifeline = child.stdin.take();
        self.watchdog = Some(child);
    }

    async fn launch_and_wait(&mut self) -> Result<(), String> {
        self.launch();
        let cli = self.cli();
        let pid_file = self.dir.join("pid");
        let waited = tokio::task::spawn_blocking(move || {
            cli.run(
                "rabbitmqctl",
                &[
                    "wait",
                    "--timeout",
                    &NODE_WAIT.as_secs().to_string(),
                    pid_file.to_str().expect("utf-8 path"),
                ],
            )
        })
        .await
        .expect("rabbitmqctl wait task");
        let ready = if waited.status.success() {
            self.wait_amqp_port().await
        } else {
            Err(format!(
                "rabbitmqctl wait failed ({}): {}{}",
                waited.status,
                String::from_utf8_lossy(&waited.stdout),
                String::from_utf8_lossy(&waited.stderr)
            ))
        };
        ready.map_err(|e| {
            let message = format!(
                "node {} (amqp {}, dist {}) did not start: {e}\n{}",
                self.name,
                self.amqp_port,
                self.dist_port,
                self.log_tail(30)
            );
            self.kill_group();
            let _ = std::fs::remove_dir_all(&self.dir);
            message
        })
    }

    async fn wait_amqp_port(&self) -> Result<(), String> {
        let deadline = Instant::now() + NODE_WAIT;
        loop {
            if TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "port {} never accepted connections",
                    self.amqp_port
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs the watchdog's process group and reaps the watchdog.
    fn kill_group(&mut self) {
        self.lifeline = None;
        if let Some(mut child) = self.watchdog.take() {
            let pgid = child.id() as i32;
            // SAFETY: kill(2) with a negative pid signals that process group;
            // the group is ours (process_group(0) at spawn).
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("node {} at panic:\n{}", self.name, self.log_tail(20));
        }
        let beam = self.beam_pid();
        self.kill_group();
        if let Some(pid) = beam {
            // Reparented to init when the watchdog died; wait until reaped or a zombie.
            let deadline = Instant::now() + Duration::from_secs(10);
            while process_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The environment every process of a node's (server and CLI) shares: its
/// own cookie (`HOME`) and no system `rabbitmq-env.conf`; in a
/// `BURROW_TEST_RABBITMQ_ROOT`, the root's epmd and `PATH`.
fn node_env(dir: &Path, command: &mut Command) {
    command
        .env("HOME", dir)
        .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
        .env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .env_remove("RABBITMQ_NODENAME")
        .env_remove("RABBITMQ_ERLANG_COOKIE");
    if rabbitmq_root().is_some() {
        command
            .env("PATH", ROOT_PATH)
            // The root has C.UTF-8 only; Erlang wants a UTF-8 locale.
            .env("LC_ALL", "C.UTF-8")
            .env("ERL_EPMD_PORT", ROOT_EPMD_PORT.to_string());
    }
}

/// The CLI tools of one node.
struct Cli {
    name: String,
    dir: PathBuf,
}

impl Cli {
    /// `<tool> -n <node> <args>`, bounded by [`NODE_WAIT`].
    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let mut command = Command::new("timeout");
        command
            .arg("--kill-after=5")
            .arg(NODE_WAIT.as_secs().to_string())
            .args(tool_argv(tool, &self.dir))
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        node_env(&self.dir, &mut command);
        command
            .output()
            .unwrap_or_else(|e| panic!("running {tool}: {e}"))
    }
}

/// `n` nodes clustered together: separate node names, AMQP and distribution
/// ports, one cookie. The first node is the one the others joined.
pub async fn cluster(prefix: &str, n: usize) -> Vec<Node> {
    assert!(n >= 1, "a cluster has at least one node");
    let cookie = random_cookie();
    let prefixes: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let nodes: Vec<Node> = futures_util::future::join_all(
        prefixes
            .iter()
            .map(|p| Node::start_inner(p, "", &cookie, false)),
    )
    .await;
    let seed = nodes[0].node_name().to_owned();
    for node in &nodes[1..] {
        node.ctl_ok(&["stop_app"]).await;
        node.ctl_ok(&["join_cluster", &seed]).await;
        node.start_app().await;
    }
    let status = nodes[0]
        .ctl_ok(&["cluster_status", "--formatter", "json"])
        .await;
    let status = String::from_utf8_lossy(&status.stdout);
    for node in &nodes {
        assert!(
            status.contains(node.node_name()),
            "{} is not in the cluster: {status}",
            node.node_name()
        );
    }
    nodes
}

fn random_cookie() -> String {
    uuid::Uuid::new_v4().simple().to_string().to_uppercase()
}

fn write_file(path: &Path, contents: &str) {
    let mut file =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Whether `pid` exists and is not a zombie.
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// Processes whose working directory is `dir`, also seen through a root's
/// bind mount (a chrooted node's reads as `<root>/<dir>` from here, whatever
/// root a dead test process used): the node directory's name is unique.
fn processes_in(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let relative = dir.strip_prefix("/").unwrap_or(dir);
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd"))
                .is_ok_and(|cwd| cwd == dir || cwd.ends_with(relative))
        })
        .collect()
}

/// Removes the directories of nodes whose test process is gone, killing
/// whatever of them survived. Runs once per test process.
fn sweep_stale_nodes() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let Ok(entries) = std::fs::read_dir(nodes_root()) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let owner = std::fs::read_to_string(dir.join("owner"))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            let young = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(60));
            // No owner yet: maybe another test process is creating it.
            if owner.is_some_and(process_alive) || (owner.is_none() && young) {
                continue;
            }
            // The watchdog, the node and any CLI run in the node's
            // directory: whatever still does belongs to this node.
            for pid in processes_in(&dir) {
                // SAFETY: kill(2) on a process whose working directory is
                // this stale node's directory.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    });
}

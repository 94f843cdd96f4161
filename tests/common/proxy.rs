//! A TCP proxy on loopback between clients and a broker, to break the
//! network in the ways a real one breaks: connections cut (FIN to both
//! sides), a blackhole (bytes stop, sockets stay open, so only heartbeats
//! notice), refused connections and added latency.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::watch,
    task::JoinHandle,
};

/// What every connection task follows.
#[derive(Debug, Clone, Default, PartialEq)]
struct Control {
    blackhole: bool,
    refuse: bool,
    latency: Duration,
    /// Bumped by [`Proxy::cut`]: connections opened before end.
    cut_generation: u64,
    stopped: bool,
}

/// A loopback TCP proxy to one upstream address.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    control: watch::Sender<Control>,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    held: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy port");
        let port = listener.local_addr().expect("proxy address").port();
        let (control, _) = watch::channel(Control::default());
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream,
            control.subscribe(),
            Counters {
                open: open.clone(),
                accepted: accepted.clone(),
                held: held.clone(),
            },
        ));
        Proxy {
            port,
            control,
            open,
            accepted,
            held,
            accept,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// An AMQP URL through the proxy (guest/guest, vhost `/`).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Closes every current connection, both sides; new ones are accepted.
    pub fn cut(&self) {
        self.control.send_modify(|c| c.cut_generation += 1);
    }

    /// Stops (or resumes) forwarding bytes both ways. Sockets stay open and
    /// nothing is lost: held bytes flow again when the blackhole ends, as
    /// after a network partition TCP retransmits.
    pub fn blackhole(&self, on: bool) {
        if !on {
            self.held.store(0, Ordering::SeqCst);
        }
        self.control.send_modify(|c| c.blackhole = on);
    }

    /// New connections are closed at once while on.
    pub fn refuse(&self, on: bool) {
        self.control.send_modify(|c| c.refuse = on);
    }

    /// Delay added to every chunk forwarded, in each direction.
    pub fn set_latency(&self, latency: Duration) {
        self.control.send_modify(|c| c.latency = latency);
    }

    /// Client connections currently open through the proxy.
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Client connections forwarded since the start (refused ones excluded):
    /// a client that reconnected shows here.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections whose client has sent bytes the blackhole is holding
    /// (e.g. publishes the broker has not seen). Reset when the blackhole ends.
    pub fn held_from_clients(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.control.send_modify(|c| c.stopped = true);
    }
}

#[derive(Clone)]
struct Counters {
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    held: Arc<AtomicUsize>,
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    control: watch::Receiver<Control>,
    counters: Counters,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let now = control.borrow().clone();
        if now.refuse || now.stopped {
            drop(client);
            continue;
        }
        counters.accepted.fetch_add(1, Ordering::SeqCst);
        let control = control.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return; // the client sees the connection closed
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            counters.open.fetch_add(1, Ordering::SeqCst);
            let _open = OpenGuard(counters.open.clone());
            let generation = now.cut_generation;
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let mut ended = control.clone();
            // Either direction ending, a cut or the proxy stopping closes
            // both sockets (dropped here): AMQP never half-closes.
            tokio::select! {
                _ = pump(client_read, server_write, control.clone(), generation, Some(counters.held)) => {}
                _ = pump(server_read, client_write, control.clone(), generation, None) => {}
                _ = ended.wait_for(|c| c.stopped || c.cut_generation != generation) => {}
            }
        });
    }
}

struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` chunk by chunk, holding while blackholed and
/// delaying each chunk by the latency. Returns when either side closes.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut control: watch::Receiver<Control>,
    generation: u64,
    held: Option<Arc<AtomicUsize>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Do not even read while blackholed: the bytes wait in the kernel.
        if control.borrow().blackhole {
            let mut counted = false;
            loop {
                tokio::select! {
                    passed = control.wait_for(|c| !c.blackhole || c.stopped || c.cut_generation != generation) => {
                        if passed.is_err() {
                            return;
                        }
                        break;
                    }
                    // Bytes arrived and wait: count this connection once.
                    ready = from.readable(), if !counted => {
                        if ready.is_err() {
                            return;
                        }
                        counted = true;
                        if let Some(held) = &held {
                            held.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // The blackhole went on while waiting: go back to holding.
            _ = control.wait_for(|c| c.blackhole) => continue,
        };
        let latency = control.borrow().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        // A chunk read just before the blackhole went on is held too, and
        // counted like bytes that wait in the kernel: otherwise a client
        // whose every byte was read in that moment would never show as held.
        if control.borrow().blackhole
            && let Some(held) = &held
        {
            held.fetch_add(1, Ordering::SeqCst);
        }
        if control
            .wait_for(|c| !c.blackhole || c.stopped || c.cut_generation != generation)
            .await
            .is_err()
        {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The shared broker's AMQP address (from `AMQP_URL`), to put a proxy in
/// front of it.
pub fn shared_broker_addr() -> SocketAddr {
    let url: lapin::uri::AMQPUri = super::amqp_url().parse().expect("AMQP_URL parses");
    let host = match url.authority.host.as_str() {
        "localhost" => "127.0.0.1".to_owned(),
        host => host.to_owned(),
    };
    std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), url.authority.port))
        .ok()
        .and_then(|mut addrs| addrs.next())
        .expect("AMQP_URL host resolves")
}

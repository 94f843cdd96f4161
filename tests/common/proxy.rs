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
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream,
            control.subscribe(),
            open.clone(),
        ));
        Proxy {
            port,
            control,
            open,
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
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.control.send_modify(|c| c.stopped = true);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    control: watch::Receiver<Control>,
    open: Arc<AtomicUsize>,
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
        let control = control.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return; // the client sees the connection closed
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            open.fetch_add(1, Ordering::SeqCst);
            let _open = OpenGuard(open);
            let generation = now.cut_generation;
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let mut ended = control.clone();
            // Either direction ending, a cut or the proxy stopping closes
            // both sockets (dropped here): AMQP never half-closes.
            tokio::select! {
                _ = pump(client_read, server_write, control.clone(), generation) => {}
                _ = pump(server_read, client_write, control.clone(), generation) => {}
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
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Do not even read while blackholed: the bytes wait in the kernel.
        if control
            .wait_for(|c| !c.blackhole || c.stopped || c.cut_generation != generation)
            .await
            .is_err()
        {
            return;
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
        // A chunk read just before the blackhole went on is held too.
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

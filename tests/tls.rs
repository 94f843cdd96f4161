//! amqps against a RabbitMQ node of the test's own with a TLS listener that
//! verifies peers: burrow verifies the broker's certificate against
//! `amqp.tls.ca_file`, presents a client certificate when configured, and
//! explains a refused handshake.
//!
//! Certificates are made at test time with the `openssl` command line (a
//! fresh CA, a server certificate for 127.0.0.1 and localhost, a client
//! certificate, and a second CA that signed nothing the broker uses), so the
//! tests need no new dependency and no checked-in keys that could expire.

mod common;

use std::{path::PathBuf, process::Command};

use burrow::{HandlerError, Registry, Settings, config::AmqpUrl, internals as connection};
use common::{node::Node, recorder::Recorder, *};

/// The password of the node's TLS user: must never show in an error.
const PASSWORD: &str = "tls-s3cret-pw";
const USER: &str = "burrow-tls";

/// A directory of certificates, removed when dropped.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The CA, the server and client certificates it signed, and another CA.
    fn generate() -> Self {
        let dir = std::env::temp_dir().join(unique("burrow-tls-certs"));
        std::fs::create_dir_all(&dir).expect("create the certificate directory");
        let certs = Certs { dir };
        let ext = |name: &str, text: &str| {
            let path = certs.path(name);
            std::fs::write(&path, text).expect("write an openssl extension file");
            path
        };
        let ca_ext = ext(
            "ca.ext",
            "basicConstraints = critical, CA:TRUE\n\
             keyUsage = critical, keyCertSign, cRLSign\n\
             subjectKeyIdentifier = hash\n",
        );
        let server_ext = ext(
            "server.ext",
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature, keyEncipherment\n\
             extendedKeyUsage = serverAuth\n\
             subjectAltName = IP:127.0.0.1, DNS:localhost\n",
        );
        let client_ext = ext(
            "client.ext",
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature\n\
             extendedKeyUsage = clientAuth\n",
        );
        for ca in ["ca", "other-ca"] {
            certs.key(ca);
            certs.openssl(&[
                "req",
                "-new",
                "-key",
                &certs.arg(&format!("{ca}.key")),
                "-subj",
                &format!("/CN=burrow test {ca}"),
                "-out",
                &certs.arg(&format!("{ca}.csr")),
            ]);
            certs.openssl(&[
                "x509",
                "-req",
                "-in",
                &certs.arg(&format!("{ca}.csr")),
                "-signkey",
                &certs.arg(&format!("{ca}.key")),
                "-days",
                "2",
                "-extfile",
                &ca_ext.to_string_lossy(),
                "-out",
                &certs.arg(&format!("{ca}.pem")),
            ]);
        }
        for (leaf, cn, ext) in [
            ("server", "localhost", &server_ext),
            ("client", "burrow-test-client", &client_ext),
        ] {
            certs.key(leaf);
            certs.openssl(&[
                "req",
                "-new",
                "-key",
                &certs.arg(&format!("{leaf}.key")),
                "-subj",
                &format!("/CN={cn}"),
                "-out",
                &certs.arg(&format!("{leaf}.csr")),
            ]);
            certs.openssl(&[
                "x509",
                "-req",
                "-in",
                &certs.arg(&format!("{leaf}.csr")),
                "-CA",
                &certs.arg("ca.pem"),
                "-CAkey",
                &certs.arg("ca.key"),
                "-set_serial",
                &format!("0x{}", uuid::Uuid::new_v4().simple()),
                "-days",
                "2",
                "-extfile",
                &ext.to_string_lossy(),
                "-out",
                &certs.arg(&format!("{leaf}.pem")),
            ]);
        }
        certs
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    /// An EC P-256 key in PKCS#8 PEM, the format `client_key_file` takes.
    fn key(&self, name: &str) {
        self.openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &self.arg(&format!("{name}.key")),
        ]);
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("run openssl (install it to run the TLS tests)");
        assert!(
            out.status.success(),
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `rabbitmq.conf` lines for a TLS listener on `port` that verifies peers.
    fn listener_conf(&self, port: u16, require_client_cert: bool) -> String {
        format!(
            "listeners.ssl.default = {port}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = {require_client_cert}\n",
            self.arg("ca.pem"),
            self.arg("server.pem"),
            self.arg("server.key"),
        )
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node with a TLS listener, and a user with a password to look for.
struct TlsNode {
    node: Node,
    port: u16,
}

impl TlsNode {
    async fn start(prefix: &str, certs: &Certs, require_client_cert: bool) -> Self {
        let port = node::free_port();
        let node = Node::start_with(prefix, &certs.listener_conf(port, require_client_cert)).await;
        node.ctl_ok(&["add_user", USER, PASSWORD]).await;
        node.ctl_ok(&["set_permissions", "-p", "/", USER, ".*", ".*", ".*"])
            .await;
        Self { node, port }
    }

    fn url(&self, host: &str) -> String {
        format!("amqps://{USER}:{PASSWORD}@{host}:{}/%2f", self.port)
    }

    /// Test settings for an app on this node over amqps.
    fn settings(&self, prefix: &str, configure: impl FnOnce(&mut Settings)) -> Settings {
        let mut settings = TestApp::new(prefix).build();
        settings.amqp.url = AmqpUrl::new(self.url("127.0.0.1"));
        configure(&mut settings);
        settings.validate().expect("valid TLS settings");
        settings
    }

    /// `(user, ssl)` of every connection the node has.
    async fn connections(&self) -> Vec<(String, String)> {
        let out = self
            .node
            .ctl_ok(&[
                "list_connections",
                "user",
                "ssl",
                "--quiet",
                "--no-table-headers",
            ])
            .await;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| {
                let (user, ssl) = line.split_once('\t')?;
                Some((user.trim().to_owned(), ssl.trim().to_owned()))
            })
            .collect()
    }
}

/// A worker and a publisher over amqps: one event published and handled.
async fn round_trip(settings: &Settings) {
    // The app lives on the test's own node: nothing to delete afterwards.
    let mut rec = Recorder::with_settings(settings.clone())
        .without_cleanup()
        .start()
        .await;
    let event = CardAdded::new("The Dispossessed");
    within(
        "a confirmed publish over amqps",
        rec.publisher.publish(&event),
    )
    .await
    .expect("the event is confirmed");
    assert_eq!(rec.next_seen().await.event, event);
    assert!(rec.next_outcome().await.acked);
    rec.stop().await;
}

fn connect_error(result: burrow::Result<lapin::Connection>) -> String {
    match result {
        Ok(_) => panic!("the connection was expected to be refused"),
        Err(e) => {
            let text = format!("{e} / {e:?}");
            assert!(!text.contains(PASSWORD), "the password leaked: {text}");
            e.to_string()
        }
    }
}

/// Connects with `amqp`, expecting a refusal whose message names `key`.
///
/// Under TLS 1.3 the client finishes its side of the handshake before the
/// broker has checked the client certificate, so the broker's alert and its
/// closing of the socket race: now and then the client reads a connection
/// reset instead of the alert. A reset is an honest refusal too, but says
/// nothing about the fix, so the attempt is repeated (a few times at most)
/// until the broker's alert is read; a connection that succeeds, or any other
/// error, fails the test at once.
async fn refused_naming(amqp: &burrow::config::AmqpSettings, key: &str) -> String {
    let mut resets = Vec::new();
    for _ in 0..5 {
        let error = connect_error(
            within(
                "a refused handshake",
                connection::open(amqp, "burrow mtls test"),
            )
            .await,
        );
        if error.contains(key) {
            return error;
        }
        assert!(
            error.contains("Connection reset by peer") || error.contains("Broken pipe"),
            "the error names the fix ({key}): {error}"
        );
        resets.push(error);
    }
    panic!("the broker's alert was never read, only resets: {resets:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_verifies_the_broker_against_our_ca_and_refuses_any_other() {
    let certs = Certs::generate();
    let tls = TlsNode::start("tls", &certs, false).await;

    // Our CA: a worker and a publisher round-trip an event over TLS, with
    // no client certificate (the listener asks for one but does not require it).
    let settings = tls.settings("tls-ok", |s| {
        s.amqp.tls.ca_file = Some(certs.path("ca.pem"));
    });
    round_trip(&settings).await;

    // The certificate names localhost too.
    let mut amqp = settings.amqp.clone();
    amqp.url = AmqpUrl::new(tls.url("localhost"));
    let conn = within(
        "amqps to localhost",
        connection::open(&amqp, "burrow tls test"),
    )
    .await
    .expect("the certificate's DNS name is accepted");
    let connections = tls.connections().await;
    assert!(
        connections
            .iter()
            .any(|(user, ssl)| user == USER && ssl == "true"),
        "the broker sees a TLS connection of {USER}: {connections:?}"
    );
    conn.close(200, "done".into()).await.unwrap();

    // A CA that did not sign the broker's certificate.
    let mut amqp = settings.amqp.clone();
    amqp.tls.ca_file = Some(certs.path("other-ca.pem"));
    let error = connect_error(
        within(
            "a refused handshake",
            connection::open(&amqp, "burrow tls test"),
        )
        .await,
    );
    assert!(
        error.contains("certificate") && error.contains("amqp.tls.ca_file"),
        "the error names the cause and the fix: {error}"
    );

    // No CA at all: the system's roots do not know our test CA either.
    let mut amqp = settings.amqp.clone();
    amqp.tls.ca_file = None;
    let error = connect_error(
        within(
            "a refused handshake",
            connection::open(&amqp, "burrow tls test"),
        )
        .await,
    );
    assert!(error.contains("amqp.tls.ca_file"), "{error}");

    // amqps to the plain AMQP port.
    let mut amqp = settings.amqp.clone();
    amqp.url = AmqpUrl::new(format!(
        "amqps://{USER}:{PASSWORD}@127.0.0.1:{}/%2f",
        tls.node.amqp_port()
    ));
    let error = connect_error(
        within(
            "a refused handshake",
            connection::open(&amqp, "burrow tls test"),
        )
        .await,
    );
    assert!(error.contains("TLS port"), "{error}");

    // A CA file that holds no certificate is a configuration error.
    let mut amqp = settings.amqp.clone();
    amqp.tls.ca_file = Some(certs.path("ca.key"));
    let error = connect_error(connection::open(&amqp, "burrow tls test").await);
    assert!(
        error.contains("amqp.tls.ca_file") && error.contains("no PEM CERTIFICATE"),
        "{error}"
    );

    // A worker with the wrong CA stops with that error instead of retrying
    // a handshake that cannot succeed.
    let mut wrong = settings.clone();
    wrong.amqp.tls.ca_file = Some(certs.path("other-ca.pem"));
    let mut registry = Registry::new();
    registry
        .on("library.record_card", |_: CardAdded, _| async {
            Ok::<_, HandlerError>(())
        })
        .unwrap();
    let handle = burrow::Worker::new(wrong, registry).unwrap().spawn();
    let stopped = within("the worker to give up", handle.join()).await;
    let error = stopped.expect_err("the worker cannot connect").to_string();
    assert!(
        error.contains("amqp.tls.ca_file") && !error.contains(PASSWORD),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_works_with_a_client_certificate_and_is_refused_without_one() {
    let certs = Certs::generate();
    let tls = TlsNode::start("mtls", &certs, true).await;

    let settings = tls.settings("mtls-ok", |s| {
        s.amqp.tls.ca_file = Some(certs.path("ca.pem"));
        s.amqp.tls.client_cert_file = Some(certs.path("client.pem"));
        s.amqp.tls.client_key_file = Some(certs.path("client.key"));
    });
    round_trip(&settings).await;

    // Without a client certificate the broker ends the handshake.
    let mut amqp = settings.amqp.clone();
    amqp.tls.client_cert_file = None;
    amqp.tls.client_key_file = None;
    refused_naming(&amqp, "amqp.tls.client_cert_file").await;

    // A client certificate from a CA the broker does not trust.
    let mut amqp = settings.amqp.clone();
    certs.key("stranger");
    certs.openssl(&[
        "req",
        "-x509",
        "-key",
        &certs.arg("stranger.key"),
        "-subj",
        "/CN=stranger",
        "-days",
        "2",
        "-out",
        &certs.arg("stranger.pem"),
    ]);
    amqp.tls.client_cert_file = Some(certs.path("stranger.pem"));
    amqp.tls.client_key_file = Some(certs.path("stranger.key"));
    refused_naming(&amqp, "amqp.tls.client_cert_file").await;
}

//! No output path shows a password, whatever characters it holds.
//!
//! Passwords are drawn from every printable ASCII character (so `/`, `@`,
//! `:`, `%`, `"`, `'`, a space, `#` and `?` all occur, unencoded as a person
//! who forgot to percent-encode would type them) and also used in their
//! percent-encoded form. Each one goes through every way burrow renders a
//! URL or an error that may quote one: the URL types' `Display` and `Debug`,
//! settings validation, the `config` crate's own messages, a failed
//! connection, the log writer and the panic hook. The binary's commands,
//! logs and endpoints are searched in `secrets.rs`.

mod common;

use std::io::Write;

use burrow::{
    Settings,
    config::{AmqpUrl, DatabaseUrl},
    redact,
};
use proptest::prelude::*;

/// `text` shows `password` in no form: raw, percent-encoded, or decoded.
fn assert_hidden(what: &str, text: &str, password: &str) {
    let encoded = encode(password);
    for form in [password, encoded.as_str()] {
        assert!(!text.contains(form), "{what} shows {form:?}:\n{text}");
    }
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Passwords of printable ASCII, long enough that finding one in a text is
/// not chance (a 3-character password could be any word), and not a part of
/// the URL around it.
fn password() -> impl Strategy<Value = String> {
    "[ -~]{8,32}".prop_filter("must not occur in the URL around it", |p| {
        let skeleton =
            "amqp://burrow-user:@127.0.0.1:1/%2f postgres://burrow-user:@127.0.0.1:1/burrow";
        !skeleton.contains(p.as_str()) && !p.contains("***")
    })
}

fn urls(password: &str, encoded: bool) -> (String, String) {
    let secret = if encoded {
        encode(password)
    } else {
        password.to_owned()
    };
    (
        format!("amqp://burrow-user:{secret}@127.0.0.1:1/%2f"),
        format!("postgres://burrow-user:{secret}@127.0.0.1:1/burrow"),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Structure alone (nothing registered yet for this password): the URL
    /// types and free text with the URL in it.
    #[test]
    fn urls_render_without_their_password(password in password(), encoded in any::<bool>()) {
        let (amqp, postgres) = urls(&password, encoded);
        let amqp_url = AmqpUrl::new(amqp.clone());
        let db_url = DatabaseUrl::new(postgres.clone());
        assert_hidden("AmqpUrl Display", &amqp_url.to_string(), &password);
        assert_hidden("AmqpUrl Debug", &format!("{amqp_url:?}"), &password);
        assert_hidden("DatabaseUrl Display", &db_url.to_string(), &password);
        assert_hidden("DatabaseUrl Debug", &format!("{db_url:?}"), &password);
        for text in [
            format!("cannot connect to {amqp}: connection refused"),
            format!("invalid value: string \"{postgres}\", expected something"),
            format!("{{\"error\":\"{amqp}\",\"then\":\"{postgres}\"}}"),
            format!("url = '{amqp}'\nnext line"),
        ] {
            assert_hidden("redact()", &redact::redact(&text), &password);
        }
    }

    /// Settings validation and the `config` crate's own error texts, then
    /// a connection attempt with the settings.
    #[test]
    fn settings_errors_and_failed_connections_hide_the_password(
        password in password(),
        encoded in any::<bool>(),
    ) {
        let (amqp, postgres) = urls(&password, encoded);
        let mut settings = Settings::default();
        settings.amqp.url = AmqpUrl::new(amqp.clone());
        settings.postgres.url = Some(DatabaseUrl::new(postgres.clone()));
        // A second mistake, so validation fails even for a well-formed URL.
        settings.app.name = "not valid".into();
        let error = settings.validate().unwrap_err().to_string();
        assert_hidden("validation", &error, &password);
        assert_hidden("Settings Debug", &format!("{settings:?}"), &password);

        // The config crate quotes a value it cannot deserialise.
        let toml = format!(
            "[amqp]\nurl = {}\nheartbeat = {}\n",
            toml_string(&amqp),
            toml_string(&amqp)
        );
        let dir = std::env::temp_dir().join(common::unique("burrow-redaction"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("default.toml"), toml).unwrap();
        let loaded = Settings::load_from(&dir, None);
        let _ = std::fs::remove_dir_all(&dir);
        let error = loaded.expect_err("a heartbeat that is a URL").to_string();
        assert_hidden("config crate error", &error, &password);

        settings.app.name = "valid".into();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let connect = runtime.block_on(burrow::internals::open(&settings.amqp, "redaction test"));
        let error = connect.expect_err("nothing listens on port 1").to_string();
        assert_hidden("connect error", &error, &password);

        let make = redact::Redacting::new(std::sync::Mutex::new(Vec::new()));
        {
            use tracing_subscriber::fmt::MakeWriter;
            let mut writer = make.make_writer();
            writeln!(writer, "ERROR lost the broker error={error} url={amqp} db={postgres}").unwrap();
        }
        let log = make.into_inner().into_inner().unwrap();
        assert_hidden("log line", &String::from_utf8(log).unwrap(), &password);
    }
}

fn toml_string(text: &str) -> String {
    // TOML basic string: escape backslashes and quotes.
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The panic hook: a child process (this test binary, asked to run only
/// [`panic_child`]) panics with a URL in its message; its stderr is searched.
#[test]
fn a_panic_message_is_redacted() {
    let password = "pa/ss word\"@#?:%x-canary";
    let url = format!("amqp://burrow-user:{password}@127.0.0.1:1/%2f");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "panic_child", "--ignored", "--nocapture"])
        .env("BURROW_TEST_PANIC_URL", &url)
        .output()
        .expect("run the child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("panicked at") && stderr.contains("***@127.0.0.1:1"),
        "the child's panic:\n{stderr}"
    );
    assert_hidden("panic", &stderr, password);
}

#[test]
#[ignore = "run by a_panic_message_is_redacted in a child process"]
fn panic_child() {
    let url = std::env::var("BURROW_TEST_PANIC_URL").expect("set by the parent");
    redact::install_panic_hook();
    panic!("could not use {url}");
}

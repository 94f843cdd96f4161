//! Keeping secrets out of everything burrow prints.
//!
//! Two layers, applied to every text that leaves the process (errors, log
//! lines, command output, `/metrics`, panic messages):
//!
//! 1. **Known secrets.** Every password burrow is configured with (the
//!    password part of `amqp.url` and `postgres.url`, the contents of
//!    `amqp.password_file` and `postgres.password_file`) is registered with
//!    [`register_secret`] when the settings are loaded or validated, in its
//!    raw, percent-decoded and percent-encoded forms. Any occurrence of one
//!    of them is replaced with `***`, wherever it stands and whatever
//!    surrounds it: this does not depend on recognising a URL.
//! 2. **URL userinfo, by structure.** In `scheme://userinfo@host`, the
//!    userinfo is everything between `://` and the *last* `@` before the
//!    next URL or the end of the line; it is replaced with `***`. A password
//!    may contain `/`, `?`, `#`, `"`, a space or an unencoded `@` (a URL a
//!    person forgot to percent-encode): none of them ends the userinfo
//!    early, so none of it is printed. What this gives up is some of the
//!    line after the URL when that text has an `@` of its own; hiding too
//!    much is the safe side.
//!
//! [`url`] renders one URL burrow holds: `scheme://***@host:port/path`, or
//! only the scheme when the text is not a URL at all.

use std::{
    borrow::Cow,
    io::{self, Write},
    sync::{OnceLock, RwLock},
};

/// What a secret is replaced with.
pub const MASK: &str = "***";

/// Secrets shorter than this are not searched for as plain text (a
/// three-letter password would blank out every word that contains it);
/// inside a URL they are still hidden by structure.
const MIN_SECRET_LEN: usize = 4;

fn secrets() -> &'static RwLock<Vec<String>> {
    static SECRETS: OnceLock<RwLock<Vec<String>>> = OnceLock::new();
    SECRETS.get_or_init(RwLock::default)
}

/// Registers `secret` so that [`redact`] replaces it wherever it appears,
/// also percent-decoded and percent-encoded. burrow registers the passwords
/// of its settings itself; call this for secrets of your own that may end up
/// in an error message.
///
/// ```
/// burrow::redact::register_secret("s3cr3t-token");
/// assert_eq!(burrow::redact::redact("token s3cr3t-token refused"), "token *** refused");
/// ```
pub fn register_secret(secret: &str) {
    let mut forms = vec![secret.to_owned(), percent_encode(secret)];
    if let Some(decoded) = percent_decode(secret) {
        forms.push(decoded);
    }
    let mut known = secrets().write().unwrap_or_else(|e| e.into_inner());
    for form in forms {
        if form.len() >= MIN_SECRET_LEN && !known.contains(&form) {
            known.push(form);
        }
    }
    // Longest first: a secret that contains another is replaced whole.
    known.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// Registers the password of the URL `url`, if it has one.
pub(crate) fn register_url_password(url: &str) {
    if let Some(userinfo) = userinfo(url)
        && let Some((_, password)) = userinfo.split_once(':')
        && !password.is_empty()
    {
        register_secret(password);
    }
}

/// `text` with every registered secret and every URL's userinfo replaced by
/// `***`, and the value of every `password=` query parameter too.
///
/// ```
/// use burrow::redact::redact;
/// // A password with '/', a space and an unencoded '@' is hidden whole.
/// let text = "cannot connect to amqp://app:ab/c d@e@broker:5672/%2f: refused";
/// assert_eq!(redact(text), "cannot connect to amqp://***@broker:5672/%2f: refused");
/// ```
pub fn redact(text: &str) -> String {
    let known = known_secrets(text);
    let text = match known {
        Cow::Borrowed(t) => t,
        Cow::Owned(ref t) => t.as_str(),
    };
    redact_query_passwords(&redact_userinfo(text))
}

fn known_secrets(text: &str) -> Cow<'_, str> {
    let known = secrets().read().unwrap_or_else(|e| e.into_inner());
    let mut out = Cow::Borrowed(text);
    for secret in known.iter() {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), MASK));
        }
    }
    out
}

/// Replaces the userinfo of every `scheme://userinfo@` in `text`.
fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        if !ends_with_scheme(&head[..pos]) {
            rest = tail;
            continue;
        }
        if let Some(done) = tail.strip_prefix(MASK).filter(|t| t.starts_with('@')) {
            out.push_str(MASK);
            rest = done;
            continue;
        }
        // The userinfo cannot run past the end of the line or into the next
        // URL: one whose scheme starts a word. A `://` inside an unencoded
        // password (`pa&://ss`, `pa ss://x`) is not one when no `@` comes
        // before it, so the search goes on to the next candidate.
        let line = tail.find(['\n', '\r']).unwrap_or(tail.len());
        let mut at = None;
        for limit in next_url_starts(&tail[..line]).chain([line]) {
            if let Some(found) = tail[..limit].rfind('@') {
                at = Some(found);
                break;
            }
        }
        match at {
            Some(at) => {
                out.push_str(MASK);
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// Where each URL in `text` starts (its scheme's first letter), for a
/// scheme that begins a word: at the start, or after a space or one of
/// `"'(<[,;=`.
fn next_url_starts(text: &str) -> impl Iterator<Item = usize> + '_ {
    text.match_indices("://").filter_map(move |(pos, _)| {
        let head = &text[..pos];
        let start = head
            .rfind(|c: char| !is_scheme_char(c))
            .map_or(0, |i| i + 1);
        let starts_word = start == 0
            || head[..start].ends_with(|c: char| {
                c.is_whitespace() || matches!(c, '"' | '\'' | '(' | '<' | '[' | ',' | ';' | '=')
            });
        (start < pos && starts_word && ends_with_scheme(head)).then_some(start)
    })
}

fn is_scheme_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')
}

/// Whether `head` ends with a URL scheme (`amqp`, `postgres+tls`, ...): a
/// letter followed by letters, digits, `+`, `-` or `.`.
fn ends_with_scheme(head: &str) -> bool {
    let start = head
        .char_indices()
        .rev()
        .take_while(|(_, c)| is_scheme_char(*c))
        .last()
        .map(|(i, _)| i);
    start.is_some_and(|i| head[i..].starts_with(|c: char| c.is_ascii_alphabetic()))
}

/// libpq-style URLs and connection strings may carry the password as
/// `password=...`.
fn redact_query_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("password=") {
        let boundary_ok = pos == 0
            || matches!(
                rest.as_bytes()[pos - 1],
                b'?' | b'&' | b';' | b' ' | b'\t' | b'"' | b'\''
            );
        let (head, tail) = rest.split_at(pos + "password=".len());
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '&' || c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        if boundary_ok {
            out.push_str(MASK);
        } else {
            out.push_str(&tail[..end]);
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// The userinfo of one URL: between `://` and the last `@` of the rest.
fn userinfo(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    rest.rfind('@').map(|at| &rest[..at])
}

/// One URL as burrow shows it: `scheme://***@host:port/path` with the
/// userinfo (user name included) replaced, and any `password=` parameter;
/// when `url` is not a URL (no `scheme://`), only `<not a URL>`.
///
/// ```
/// assert_eq!(
///     burrow::redact::url("postgres://app:p@ss/w?rd@db:5432/app"),
///     "postgres://***@db:5432/app"
/// );
/// assert_eq!(burrow::redact::url("amqp://broker:5672"), "amqp://broker:5672");
/// ```
pub fn url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".into();
    };
    let scheme_ok = scheme
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && scheme.chars().all(is_scheme_char);
    if !scheme_ok {
        return "<not a URL>".into();
    }
    let after = match rest.rfind('@') {
        Some(at) => format!("{MASK}{}", &rest[at..]),
        None => rest.to_owned(),
    };
    let shown = format!("{scheme}://{}", redact_query_passwords(&after));
    // A known secret could still stand in the host or path part of a URL
    // typed wrongly (a password after the '@').
    known_secrets(&shown).into_owned()
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes; `None` when there are none or the result is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    if !text.contains('%') {
        return None;
    }
    let bytes = text.as_bytes();
    let hex = |b: &u8| (*b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| Some((hex(bytes.get(i + 1)?)?, hex(bytes.get(i + 2)?)?)))
            .flatten();
        match escaped {
            Some((high, low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A `tracing-subscriber` writer factory whose writers redact every line.
///
/// The formatting layer writes each event as one `write` of the whole line,
/// so a secret cannot be split across two calls.
///
/// ```
/// let make_writer = burrow::redact::Redacting::new(std::io::stderr);
/// let _subscriber = tracing_subscriber::fmt().with_writer(make_writer);
/// ```
#[derive(Debug, Clone)]
pub struct Redacting<M> {
    inner: M,
}

impl<M> Redacting<M> {
    /// Redacts what `inner`'s writers are given.
    pub fn new(inner: M) -> Self {
        Self { inner }
    }

    /// The wrapped writer factory.
    pub fn into_inner(self) -> M {
        self.inner
    }
}

impl<'a, M: tracing_subscriber::fmt::MakeWriter<'a>> tracing_subscriber::fmt::MakeWriter<'a>
    for Redacting<M>
{
    type Writer = RedactingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter {
            inner: self.inner.make_writer(),
        }
    }
}

/// One writer of [`Redacting`].
#[derive(Debug)]
pub struct RedactingWriter<W> {
    inner: W,
}

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.inner.write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Replaces the panic hook with one that prints the panic redacted (and its
/// backtrace, when `RUST_BACKTRACE` asks for one): a panic message can quote
/// a value that holds a URL.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "Box<dyn Any>".to_owned());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let mut text = format!("thread '{name}' panicked at {location}:\n{payload}\n");
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            text.push_str(&format!("stack backtrace:\n{backtrace}\n"));
        }
        let _ = io::stderr().write_all(redact(&text).as_bytes());
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_hidden_whatever_the_password_holds() {
        for password in [
            "ab/cd-secret",
            "ab cd-secret",
            "ab\"cd-secret",
            "ab'cd-secret",
            "ab@cd-secret",
            "ab#cd?secret",
            "ab:cd%2Fsecret",
            "@@@",
            "/",
            "?r\\'Jq\\&://L*g[1q~avQ1X$+X#v'.)5",
            "ab cd://x-secret",
            "ab\"x://secret",
            "ab:x://secret",
        ] {
            let url = format!("amqp://user:{password}@127.0.0.1:5672/%2f");
            let hidden = "amqp://***@127.0.0.1:5672/%2f";
            for (text, want) in [
                (url.clone(), hidden.to_owned()),
                (
                    format!("error: cannot connect to {url}: refused"),
                    format!("error: cannot connect to {hidden}: refused"),
                ),
                (format!("\"{url}\""), format!("\"{hidden}\"")),
                (
                    format!("invalid value: string \"{url}\", expected a URL"),
                    format!("invalid value: string \"{hidden}\", expected a URL"),
                ),
            ] {
                assert_eq!(redact_userinfo(&text), want, "{password:?}");
            }
            assert_eq!(super::url(&url), "amqp://***@127.0.0.1:5672/%2f");
        }
    }

    #[test]
    fn text_without_userinfo_is_unchanged() {
        for text in [
            "amqp://127.0.0.1:5672/%2f",
            "see https://www.rabbitmq.com/docs/confirms for why",
            "user@example.com wrote: no URL here",
        ] {
            assert_eq!(redact_userinfo(text), text);
        }
    }

    #[test]
    fn an_at_sign_later_on_a_urls_line_is_taken_as_the_end_of_its_userinfo() {
        // A password may hold spaces and `://`, so an `@` further along the
        // line may end one: such text is hidden. Hiding too much loses no
        // secret; stopping early could print one.
        assert_eq!(redact_userinfo("not://a scheme? 1://x@y"), "not://***@y");
    }

    #[test]
    fn two_urls_on_one_line_are_redacted_each() {
        let text = "from amqp://a:pw1-secret@h1:5672 to postgres://b:pw2-secret@h2/db";
        assert_eq!(
            redact_userinfo(text),
            "from amqp://***@h1:5672 to postgres://***@h2/db"
        );
    }

    #[test]
    fn already_redacted_urls_keep_the_rest_of_the_line() {
        let text = "amqp://***@host:5672: refused by rabbit@node";
        assert_eq!(redact_userinfo(text), text);
    }

    #[test]
    fn not_a_url_shows_nothing_of_it() {
        assert_eq!(url("user:secret-pass@host"), "<not a URL>");
        assert_eq!(url("1x://user:secret@host"), "<not a URL>");
    }

    #[test]
    fn query_passwords_are_hidden() {
        assert_eq!(
            redact("postgres://db/app?sslmode=require&password=hunter2-x"),
            "postgres://db/app?sslmode=require&password=***"
        );
        assert_eq!(
            redact("host=db password=hunter2-x user=app"),
            "host=db password=*** user=app"
        );
    }

    #[test]
    fn registered_secrets_are_hidden_in_every_form() {
        register_secret("Zq/9+reg@istered");
        for text in [
            "Zq/9+reg@istered",
            "Zq%2F9%2Breg%40istered",
            "a Debug dump { password: \"Zq/9+reg@istered\" }",
        ] {
            assert!(!redact(text).contains("istered"), "{text}");
        }
        register_secret("Ab%2Fdecoded-form");
        assert!(!redact("x Ab/decoded-form y").contains("decoded-form"));
    }

    #[test]
    fn percent_coding_round_trips() {
        let raw = "a/b c@d%e:f\"g'h#i?j";
        assert_eq!(percent_decode(&percent_encode(raw)).as_deref(), Some(raw));
        assert_eq!(percent_decode("plain"), None);
        assert_eq!(percent_decode("50%").as_deref(), Some("50%"));
    }

    #[test]
    fn the_log_writer_redacts_each_line() {
        let mut out = Vec::new();
        {
            let mut w = RedactingWriter { inner: &mut out };
            w.write_all(b"connecting to amqp://u:pa ss@h:5672\n")
                .unwrap();
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "connecting to amqp://***@h:5672\n"
        );
    }
}

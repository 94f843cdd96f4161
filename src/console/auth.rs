//! Who may use the console, and proof that a POST came from its own pages.
//!
//! - **Open**: bound to a loopback address with no token. Whoever can reach
//!   the port is on this machine (or came through `kubectl port-forward`).
//! - **Token**: `http.console_token` is set. A browser signs in once with the
//!   token and gets a session cookie (`HttpOnly`, `SameSite=Strict`, scoped
//!   to `/console`); a script sends `Authorization: Bearer <token>`.
//! - **Refused**: bound to a non-loopback address with no token. Every
//!   console request is refused with the setting that fixes it; `/healthz`,
//!   `/readyz` and `/metrics` are unaffected.
//!
//! Every POST from a page carries a CSRF token that only the console's own
//! pages know (another site cannot read them), and a POST whose `Origin` or
//! `Sec-Fetch-Site` says it came from elsewhere is refused whatever it
//! carries. A bearer-token request carries no ambient credential, so it
//! needs no CSRF token.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::http::{HeaderMap, header};

/// The session cookie's name.
pub(super) const COOKIE: &str = "burrow_console";

/// How long a signed-in browser session lasts without use.
const SESSION_IDLE: Duration = Duration::from_secs(8 * 3600);

/// At most this many sessions are kept; the oldest goes first.
const MAX_SESSIONS: usize = 256;

/// How the console admits requests (see the module docs).
#[derive(Debug)]
pub(super) enum Access {
    Open { csrf: String },
    Token { token: String, sessions: Sessions },
    Refused { addr: SocketAddr },
}

/// The signed-in browser sessions: id → (CSRF token, last use).
#[derive(Debug, Default)]
pub(super) struct Sessions(Mutex<HashMap<String, (String, Instant)>>);

/// Who made a request, for the audit log and the pages.
#[derive(Debug, Clone)]
pub(super) struct Operator {
    /// `local`, `session 1a2b3c4d` or `bearer token`, with the peer address.
    pub(super) who: String,
    /// The token a POST from this operator's pages must carry, if any.
    pub(super) csrf: Option<String>,
    /// Signed in with a session (the page shows "sign out").
    pub(super) signed_in: bool,
}

/// Why a request is not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Denied {
    /// No token is configured on a non-loopback bind.
    NeedsToken { addr: SocketAddr },
    /// Not signed in (or a wrong bearer token).
    SignIn,
    /// A POST without the page's CSRF token, or from another origin.
    Forged(&'static str),
}

/// A fresh random token: 128 bits from the OS generator (UUID v4 uses
/// `getrandom`), as hex.
fn random_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Compares in time independent of where the strings differ, so that the
/// answer's timing does not leak a token byte by byte. Three lines do not
/// warrant a dependency.
pub(super) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Access {
    /// The access rule for a console bound at `addr` with `token`.
    pub(super) fn new(addr: SocketAddr, token: Option<String>) -> Self {
        match token {
            Some(token) => Access::Token {
                token,
                sessions: Sessions::default(),
            },
            None if addr.ip().is_loopback() => Access::Open {
                csrf: random_token(),
            },
            None => Access::Refused { addr },
        }
    }

    /// Whether a sign-in page exists (token mode).
    pub(super) fn needs_sign_in(&self) -> bool {
        matches!(self, Access::Token { .. })
    }

    /// Admits a request with `headers` from `peer`, or says why not.
    pub(super) fn admit(
        &self,
        headers: &HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Result<Operator, Denied> {
        let from = peer.map_or_else(|| "unknown peer".to_owned(), |p| p.ip().to_string());
        match self {
            Access::Refused { addr } => Err(Denied::NeedsToken { addr: *addr }),
            Access::Open { csrf } => Ok(Operator {
                who: format!("local ({from})"),
                csrf: Some(csrf.clone()),
                signed_in: false,
            }),
            Access::Token { token, sessions } => {
                if let Some(bearer) = bearer(headers) {
                    return if same(bearer, token) {
                        Ok(Operator {
                            who: format!("bearer token ({from})"),
                            csrf: None,
                            signed_in: false,
                        })
                    } else {
                        Err(Denied::SignIn)
                    };
                }
                let id = cookie(headers, COOKIE).ok_or(Denied::SignIn)?;
                let csrf = sessions.touch(id).ok_or(Denied::SignIn)?;
                Ok(Operator {
                    who: format!("session {} ({from})", &id[..8.min(id.len())]),
                    csrf: Some(csrf),
                    signed_in: true,
                })
            }
        }
    }

    /// Checks a sign-in attempt; on success the new session's cookie value.
    pub(super) fn sign_in(&self, offered: &str) -> Option<String> {
        match self {
            Access::Token { token, sessions } if same(offered, token) => Some(sessions.open()),
            _ => None,
        }
    }

    /// Ends the session named by the request's cookie, if any.
    pub(super) fn sign_out(&self, headers: &HeaderMap) {
        if let (Access::Token { sessions, .. }, Some(id)) = (self, cookie(headers, COOKIE)) {
            sessions.close(id);
        }
    }
}

impl Sessions {
    fn open(&self) -> String {
        let id = format!("{}{}", random_token(), random_token());
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.retain(|_, (_, used)| now.duration_since(*used) < SESSION_IDLE);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(id.clone(), (random_token(), now));
        id
    }

    /// The session's CSRF token, refreshing its last use; `None` when it is
    /// unknown or expired.
    fn touch(&self, id: &str) -> Option<String> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match map.get_mut(id) {
            Some((csrf, used)) if now.duration_since(*used) < SESSION_IDLE => {
                *used = now;
                Some(csrf.clone())
            }
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    fn close(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

impl Operator {
    /// Checks that a POST with `headers` and the form field `csrf` came from
    /// one of the console's own pages.
    pub(super) fn check_post(&self, headers: &HeaderMap, csrf: Option<&str>) -> Result<(), Denied> {
        if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
            && !matches!(site, "same-origin" | "none")
        {
            return Err(Denied::Forged("the request came from another site"));
        }
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            if origin != "null" && origin_host != host {
                return Err(Denied::Forged("the request came from another origin"));
            }
        }
        match &self.csrf {
            None => Ok(()),
            Some(expected) if csrf.is_some_and(|c| same(c, expected)) => Ok(()),
            Some(_) => Err(Denied::Forged(
                "the form carries no valid CSRF token; reload the page and try again",
            )),
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The value of cookie `name`. One cookie of our own, read from a header
/// whose grammar is `name=value; name=value`: a cookie crate would parse far
/// more than this needs.
pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_non_loopback_bind_without_a_token_is_refused() {
        let addr: SocketAddr = "0.0.0.0:9090".parse().unwrap();
        let access = Access::new(addr, None);
        assert_eq!(
            access.admit(&HeaderMap::new(), None).unwrap_err(),
            Denied::NeedsToken { addr }
        );
        let local = Access::new("127.0.0.1:9090".parse().unwrap(), None);
        assert!(local.admit(&HeaderMap::new(), None).is_ok());
    }

    #[test]
    fn a_token_admits_a_session_or_a_bearer_and_nothing_else() {
        let access = Access::new(
            "0.0.0.0:9090".parse().unwrap(),
            Some("0123456789abcdef".into()),
        );
        assert_eq!(
            access.admit(&HeaderMap::new(), None).unwrap_err(),
            Denied::SignIn
        );
        assert!(access.sign_in("wrong").is_none());
        let id = access.sign_in("0123456789abcdef").expect("signed in");
        let with_cookie = headers(&[("cookie", &format!("other=1; {COOKIE}={id}"))]);
        let op = access.admit(&with_cookie, None).expect("session admitted");
        assert!(op.signed_in && op.csrf.is_some());
        let bearer = headers(&[("authorization", "Bearer 0123456789abcdef")]);
        assert!(access.admit(&bearer, None).unwrap().csrf.is_none());
        let wrong = headers(&[("authorization", "Bearer 0123456789abcdeX")]);
        assert_eq!(access.admit(&wrong, None).unwrap_err(), Denied::SignIn);
        access.sign_out(&with_cookie);
        assert_eq!(
            access.admit(&with_cookie, None).unwrap_err(),
            Denied::SignIn
        );
    }

    #[test]
    fn a_post_needs_the_page_token_and_the_same_origin() {
        let op = Operator {
            who: "local".into(),
            csrf: Some("t0k".into()),
            signed_in: false,
        };
        let same_site = headers(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "http://127.0.0.1:9090"),
        ]);
        assert!(op.check_post(&same_site, Some("t0k")).is_ok());
        assert!(op.check_post(&same_site, Some("t0x")).is_err());
        assert!(op.check_post(&same_site, None).is_err());
        let other = headers(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "http://evil.example"),
        ]);
        assert!(op.check_post(&other, Some("t0k")).is_err());
        let cross = headers(&[("sec-fetch-site", "cross-site")]);
        assert!(op.check_post(&cross, Some("t0k")).is_err());
    }

    #[test]
    fn comparison_is_exact() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
    }
}

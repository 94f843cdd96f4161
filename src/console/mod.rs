//! The operator console: the app's queues and dead letters in a browser, at
//! `/console` on the worker's HTTP endpoint (or `burrow console` on a
//! machine that runs no worker).
//!
//! - `GET /console` — overview: the app queue, each retry step and the
//!   dead-letter queue with their depths and consumers; with a worker in
//!   the process, its state and what it delivered, handled, retried and
//!   dead-lettered per minute.
//! - `GET /console/letters` — the dead letters, filtered (event pattern,
//!   handler, reason, age) and paged.
//! - `GET /console/letters/{id}` — one letter: properties, headers, the
//!   body, what burrow recorded about its failure.
//! - `POST /console/letters/replay` — replay the selection or the filter,
//!   through [`crate::dlq::replay`]: confirmed, then acked.
//! - `GET /console/letters/export` (a filter) and `POST` (the ticked
//!   letters) — JSON lines, as `burrow dlq export`.
//! - `GET`/`POST /console/letters/purge` — purge behind a typed confirmation
//!   that names the count; never more than the count confirmed.
//!
//! Every action goes through the same functions as `burrow dlq`, and is
//! logged (target `burrow::console`) with who did it, from where, and what.
//! Who may use it: [`auth`]. Reading needs no JavaScript; the HTML is
//! rendered on the server and the assets are compiled into the binary.
//!
//! Browsing dead letters is a redelivery (see [`crate::dlq`]): a page view
//! takes the letters it shows (and those before them) with `basic.get` and
//! returns them.

mod auth;
mod extract;
mod letters;
mod overview;
mod pages;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use maud::html;
use tokio::sync::watch;

use self::{
    auth::{Access, Denied, Operator},
    extract::Write,
};
use crate::{
    config::Settings, consumer::WorkerState, error::Result, metrics::Metrics, publisher::Publisher,
};

/// The console of one app: build it, then mount [`Console::router`].
///
/// ```no_run
/// # async fn example(settings: burrow::Settings) -> burrow::Result<()> {
/// let publisher = burrow::Publisher::connect(&settings).await?;
/// let addr = "127.0.0.1:9091".parse().unwrap();
/// let console = burrow::console::Console::new(&settings, publisher, addr)?;
/// let listener = burrow::http::bind(addr).await?;
/// burrow::http::serve(listener, console.router(), std::future::pending()).await?;
/// # Ok(())
/// # }
/// ```
pub struct Console {
    inner: Inner,
}

struct Inner {
    settings: Settings,
    publisher: Publisher,
    access: Access,
    worker: Option<overview::WorkerView>,
}

/// The console as the handlers share it.
#[derive(Clone)]
struct Shared(Arc<Inner>);

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("app", &self.inner.settings.app.name)
            .field("access", &self.inner.access)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// The console for `settings`' app, served at `addr` (which decides, with
    /// `http.console_token`, who may use it: see the module docs). Replays
    /// publish through `publisher`.
    pub fn new(settings: &Settings, publisher: Publisher, addr: SocketAddr) -> Result<Self> {
        let token = settings.http.console_token()?;
        let access = Access::new(addr, token);
        if let Access::Refused { addr } = &access {
            tracing::warn!(
                %addr,
                "the console at /console refuses every request: http.addr is not a loopback \
                 address and http.console_token is unset"
            );
        }
        Ok(Self {
            inner: Inner {
                settings: settings.clone(),
                publisher,
                access,
                worker: None,
            },
        })
    }

    /// Shows the state and the per-minute rates of the worker recording into
    /// `metrics` (the console of `burrow run`).
    pub fn with_worker(mut self, metrics: Metrics, state: watch::Receiver<WorkerState>) -> Self {
        self.inner.worker = Some(overview::WorkerView::new(metrics, state));
        self
    }

    /// The console's routes, all under `/console`, to merge into a router.
    pub fn router(self) -> Router {
        Router::new()
            .route("/console", get(overview::page))
            .route("/console/", get(|| async { Redirect::to("/console") }))
            .route("/console/letters", get(letters::list))
            .route(
                "/console/letters/export",
                get(letters::export).post(letters::export_selected),
            )
            .route("/console/letters/replay", post(letters::replay))
            .route(
                "/console/letters/purge",
                get(letters::purge_form).post(letters::purge),
            )
            .route("/console/letters/{id}", get(letters::detail))
            .route("/console/login", get(login_form).post(login))
            .route("/console/logout", post(logout))
            .route("/console/assets/console.css", get(css))
            .route("/console/assets/console.js", get(js))
            .with_state(Shared(Arc::new(self.inner)))
    }
}

impl Shared {
    fn app(&self) -> &str {
        &self.0.settings.app.name
    }
}

fn refuse(console: &Shared, denied: Denied) -> Response {
    match denied {
        Denied::SignIn => Redirect::to("/console/login").into_response(),
        Denied::NeedsToken { addr } => error_page(
            console,
            StatusCode::FORBIDDEN,
            "Console disabled",
            &format!(
                "This endpoint listens on {addr}, which is not a loopback address, and no \
                 console token is set. Set http.console_token (BURROW__HTTP__CONSOLE_TOKEN) or \
                 http.console_token_file, or reach the console through a loopback bind \
                 (kubectl port-forward)."
            ),
        ),
        Denied::Forged(why) => error_page(console, StatusCode::FORBIDDEN, "Refused", why),
    }
}

/// A page that says what went wrong and what to do.
fn error_page(console: &Shared, status: StatusCode, title: &str, text: &str) -> Response {
    let body = html! {
        (pages::notice("error", text))
        p { a href="/console" { "Back to the overview" } }
    };
    (status, pages::layout(console.app(), title, None, body)).into_response()
}

/// A URL-encoded form or query string, keys in order, repeated keys kept
/// (`ids=a&ids=b`: the table's check boxes), which serde's flat form
/// decoding cannot hold.
#[derive(Debug, Default)]
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(bytes: &[u8]) -> Self {
        Form(form_urlencoded::parse(bytes).into_owned().collect())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, v)| k == key && !v.trim().is_empty())
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }
}

async fn login_form(State(console): State<Shared>) -> Response {
    if !console.0.access.needs_sign_in() {
        return Redirect::to("/console").into_response();
    }
    login_page(&console, StatusCode::OK, None)
}

fn login_page(console: &Shared, status: StatusCode, problem: Option<&str>) -> Response {
    let body = html! {
        @if let Some(p) = problem { (pages::notice("error", p)) }
        form.filters method="post" action="/console/login" {
            label { "Console token" input type="password" name="token" autocomplete="current-password" autofocus; }
            button type="submit" { "Sign in" }
        }
        p.meta { "The token is the value of http.console_token (or the file http.console_token_file names)." }
    };
    (status, pages::layout(console.app(), "Sign in", None, body)).into_response()
}

async fn login(State(console): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let from = extract::peer(&parts)
        .map(|p| p.ip().to_string())
        .unwrap_or_default();
    // Same-origin only, like every POST; there is no CSRF token before a
    // session exists.
    let anyone = Operator {
        who: from.clone(),
        csrf: None,
        signed_in: false,
    };
    if let Err(denied) = anyone.check_post(&parts.headers, None) {
        return refuse(&console, denied);
    }
    let Ok(body) = axum::body::to_bytes(body, 4096).await else {
        return login_page(
            &console,
            StatusCode::PAYLOAD_TOO_LARGE,
            Some("The sign-in form is too large."),
        );
    };
    let form = Form::parse(&body);
    match console.0.access.sign_in(form.get("token").unwrap_or("")) {
        Some(session) => {
            tracing::info!(target: "burrow::console", peer = %from, "console sign-in");
            with_cookie(Redirect::to("/console").into_response(), &session, "")
        }
        None => {
            tracing::warn!(target: "burrow::console", peer = %from, "console sign-in refused: wrong token");
            login_page(
                &console,
                StatusCode::UNAUTHORIZED,
                Some("That is not the console token."),
            )
        }
    }
}

async fn logout(State(console): State<Shared>, headers: HeaderMap, _post: Write) -> Response {
    console.0.access.sign_out(&headers);
    with_cookie(
        Redirect::to("/console/login").into_response(),
        "",
        "; Max-Age=0",
    )
}

/// `response` setting the session cookie to `value` (with `extra`
/// attributes): only the console's paths, never to scripts, never sent by
/// another site.
fn with_cookie(mut response: Response, value: &str, extra: &str) -> Response {
    let cookie = format!(
        "{}={value}; Path=/console; HttpOnly; SameSite=Strict{extra}",
        auth::COOKIE
    );
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        pages::CSS,
    )
}

async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        pages::JS,
    )
}

//! The console's HTML: a layout and the parts every page shares, rendered
//! on the server with maud (which escapes every value it inserts, so a
//! header or body a publisher chose cannot become markup).

use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::auth::Operator;
use crate::dlq::Filter;

/// The stylesheet, served from the binary (no CDN: the machines that run
/// workers often reach no internet).
pub(super) const CSS: &str = include_str!("assets/console.css");

/// A little script for conveniences (select all, a confirm prompt). Every
/// page reads fine without it; actions are plain HTML forms.
pub(super) const JS: &str = include_str!("assets/console.js");

/// A whole page: `title`, the app's name, the navigation, `body`.
pub(super) fn layout(app: &str, title: &str, operator: Option<&Operator>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="same-origin";
                title { (title) " · burrow · " (app) }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
            }
            body {
                header {
                    span.brand { "burrow" }
                    span.app { (app) }
                    nav {
                        a href="/console" { "Overview" }
                        a href="/console/letters" { "Dead letters" }
                    }
                    @if let Some(op) = operator {
                        span.who title="who the audit log records" { (op.who) }
                        @if op.signed_in {
                            form.inline method="post" action="/console/logout" {
                                (csrf_field(op))
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

/// The hidden CSRF field every form of the console carries.
pub(super) fn csrf_field(operator: &Operator) -> Markup {
    html! {
        @if let Some(token) = &operator.csrf {
            input type="hidden" name="csrf" value=(token);
        }
    }
}

/// Hidden fields repeating `filter`, for a form that acts on it.
pub(super) fn filter_fields(filter: &Filter) -> Markup {
    html! {
        @if let Some(v) = &filter.event { input type="hidden" name="event" value=(v); }
        @if let Some(v) = &filter.handler { input type="hidden" name="handler" value=(v); }
        @if let Some(v) = &filter.reason { input type="hidden" name="reason" value=(v); }
        @if let Some(d) = filter.older_than {
            input type="hidden" name="older_than" value=(humantime::format_duration(d));
        }
        @for id in &filter.ids { input type="hidden" name="ids" value=(id); }
    }
}

/// `filter` as a query string (`event=…&reason=…`), for links.
pub(super) fn filter_query(filter: &Filter) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    if let Some(v) = &filter.event {
        q.append_pair("event", v);
    }
    if let Some(v) = &filter.handler {
        q.append_pair("handler", v);
    }
    if let Some(v) = &filter.reason {
        q.append_pair("reason", v);
    }
    if let Some(d) = filter.older_than {
        q.append_pair("older_than", &humantime::format_duration(d).to_string());
    }
    for id in &filter.ids {
        q.append_pair("ids", id);
    }
    q.finish()
}

/// A message box: `kind` is `ok`, `warn` or `error`.
pub(super) fn notice(kind: &str, text: &str) -> Markup {
    html! { p class={ "notice " (kind) } role="status" { (text) } }
}

/// A body shown as pretty JSON when it parses, else as text (lossy UTF-8),
/// with its size.
pub(super) fn body_view(body: &[u8]) -> Markup {
    let (label, text) = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(json) => (
            "JSON",
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        ),
        Err(_) => (
            "not JSON, shown raw",
            String::from_utf8_lossy(body).into_owned(),
        ),
    };
    html! {
        p.meta { (body.len()) " bytes, " (label) }
        pre.body id="body" { (text) }
    }
}

/// A small key/value table.
pub(super) fn facts(rows: &[(&str, String)]) -> Markup {
    html! {
        table.facts {
            @for (k, v) in rows {
                tr { th scope="row" { (k) } td { (v) } }
            }
        }
    }
}

/// `text`, or a dash when it is empty.
pub(super) fn or_dash(text: &str) -> PreEscaped<String> {
    if text.is_empty() {
        PreEscaped("&ndash;".into())
    } else {
        PreEscaped(maud::html! { (text) }.into_string())
    }
}

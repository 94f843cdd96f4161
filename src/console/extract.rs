//! The console's request extractors: every page and action starts by
//! admitting its operator ([`super::auth`]), so the handlers receive one.

use std::net::SocketAddr;

use axum::{
    extract::{ConnectInfo, FromRequest, FromRequestParts, Request},
    http::{StatusCode, request::Parts},
    response::{IntoResponse, Response},
};

use super::{Form, Shared, auth::Operator, error_page, refuse};

/// The most a console form may send: ids of a page of letters and a filter.
const MAX_FORM_BYTES: usize = 256 * 1024;

/// A request the console refused, as the page that says why.
pub(super) struct Refused(Response);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        self.0
    }
}

/// The peer address, when the server records it ([`crate::http::serve`]
/// does); a router embedded without it still works.
pub(super) fn peer(parts: &Parts) -> Option<SocketAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

/// A GET by an admitted operator, with its query string.
pub(super) struct Read {
    pub(super) operator: Operator,
    pub(super) query: Form,
}

impl FromRequestParts<Shared> for Read {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, console: &Shared) -> Result<Self, Refused> {
        let operator = console
            .0
            .access
            .admit(&parts.headers, peer(parts))
            .map_err(|denied| Refused(refuse(console, denied)))?;
        let query = Form::parse(parts.uri.query().unwrap_or_default().as_bytes());
        Ok(Read { operator, query })
    }
}

/// A POST by an admitted operator from one of the console's own pages (its
/// CSRF token and origin checked), with its form.
pub(super) struct Write {
    pub(super) operator: Operator,
    pub(super) form: Form,
}

impl FromRequest<Shared> for Write {
    type Rejection = Refused;

    async fn from_request(request: Request, console: &Shared) -> Result<Self, Refused> {
        let (parts, body) = request.into_parts();
        let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
            .await
            .map_err(|_| {
                Refused(error_page(
                    console,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Form too large",
                    &format!("A console form carries at most {MAX_FORM_BYTES} bytes; select fewer letters."),
                ))
            })?;
        let form = Form::parse(&bytes);
        let operator = console
            .0
            .access
            .admit(&parts.headers, peer(&parts))
            .map_err(|denied| Refused(refuse(console, denied)))?;
        operator
            .check_post(&parts.headers, form.get("csrf"))
            .map_err(|denied| {
                tracing::warn!(target: "burrow::console", operator = %operator.who, "refused a POST: {denied:?}");
                Refused(refuse(console, denied))
            })?;
        Ok(Write { operator, form })
    }
}

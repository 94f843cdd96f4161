//! Per-handler limits on the registry: set in code, then armed by the
//! worker with the settings' `[limits]` over them (see [`crate::limit`]).

use std::{collections::BTreeMap, sync::Arc};

use super::{RegisteredHandler, Registry};
use crate::{
    error::{Error, Result},
    limit::{HandlerLimits, LimitSettings, Limiter},
};

impl Registry {
    /// Limits handler `name`'s runs: at most so many at a time, at most so
    /// many starts per period (see [`crate::HandlerLimits`]). `[limits]` in
    /// the settings overrides what is set here, one limit at a time.
    ///
    /// ```
    /// use std::time::Duration;
    /// use burrow::{HandlerError, HandlerLimits, Rate, Registry};
    /// # #[derive(serde::Serialize, serde::Deserialize)]
    /// # pub struct CardAddedToLibraryEvent { aggregate_id: String }
    /// # impl burrow::Event for CardAddedToLibraryEvent {
    /// #     const EVENT_TYPE: &'static str = "CardAddedToLibraryEvent";
    /// # }
    /// let mut registry = Registry::new();
    /// registry
    ///     .on("pricing.fetch_price", |_: CardAddedToLibraryEvent, _| async { Ok::<_, HandlerError>(()) })?
    ///     .limit(
    ///         "pricing.fetch_price",
    ///         HandlerLimits::new().concurrency(4).rate(Rate::new(100, Duration::from_secs(1))?),
    ///     )?;
    /// # Ok::<(), burrow::Error>(())
    /// ```
    pub fn limit(&mut self, name: &str, limits: HandlerLimits) -> Result<&mut Self> {
        self.named(name, "limit")?.limits = limits;
        Ok(self)
    }

    /// Applies `[limits]` from the settings over the limits set in code and
    /// gives every limited handler its permits. A name that is no handler's
    /// is an error: a typo would otherwise leave the handler unlimited.
    pub(crate) fn arm_limits(&mut self, settings: &BTreeMap<String, LimitSettings>) -> Result<()> {
        for (name, configured) in settings {
            let from_settings = configured.limits(name)?;
            let known = self.names();
            let handler = self.named(name, "limit").map_err(|_| {
                Error::config(
                    "limits",
                    format!(
                        "limits.\"{name}\" names no handler of this app (registered: {known}); \
                         correct the name or remove the section"
                    ),
                )
            })?;
            handler.limits = handler.limits.overridden_by(from_settings);
        }
        for handler in &mut self.handlers {
            handler.limiter = handler
                .limits
                .is_limited()
                .then(|| Arc::new(Limiter::new(handler.limits)));
        }
        Ok(())
    }

    pub(super) fn names(&self) -> String {
        self.handlers
            .iter()
            .map(|h| h.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Handler `name`, to `change` it; an unknown name is an error that
    /// lists the registered ones.
    pub(super) fn named(&mut self, name: &str, change: &str) -> Result<&mut RegisteredHandler> {
        let known = self.names();
        self.handlers
            .iter_mut()
            .find(|h| &*h.name == name)
            .ok_or_else(|| {
                Error::registry(
                    Some(name),
                    format!(
                        "cannot {change} {name:?}: no handler has that name (registered: {known})"
                    ),
                )
            })
    }
}

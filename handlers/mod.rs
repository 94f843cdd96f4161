//! The app's handler modules.
//!
//! Each module is one file holding the events it subscribes to (its own view
//! of them: only the fields it needs), its handlers, a `register` function
//! and its unit tests. To add a module, write `handlers/<name>.rs` and add
//! its name to the `modules!` line below.

use burrow::cli::Register;

/// Declares the modules and [`MODULES`], their `register` functions in order.
macro_rules! modules {
    ($($module:ident),* $(,)?) => {
        $(pub mod $module;)*

        /// Every handler module's `register`, in order.
        pub const MODULES: &[Register] = &[$($module::register),*];
    };
}

modules![feeds, notifications, collections];

/// Sample events `burrow demo` publishes: `(event type, JSON body)`, shaped
/// like what a TypeScript publisher sends.
pub fn samples() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        (
            "CardAddedToLibraryEvent",
            serde_json::json!({
                "aggregateId": "card-1",
                "userId": "user-ada",
                "libraryId": "library-1",
                "dateTimeOccurred": "2026-11-23T09:00:00Z"
            }),
        ),
        (
            "CardAddedToLibraryEvent",
            serde_json::json!({
                "aggregateId": "card-2",
                "userId": "user-grace",
                "libraryId": "library-1",
                "dateTimeOccurred": "2026-11-23T09:00:01Z"
            }),
        ),
        (
            "CollectionCreatedEvent",
            serde_json::json!({
                "aggregateId": "collection-1",
                "name": "Papers to read",
                "authorId": "user-ada",
                "dateTimeOccurred": "2026-11-23T09:00:02Z"
            }),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use burrow::Registry;

    fn register(registry: &mut Registry) -> burrow::Result<()> {
        let ctx = burrow::cli::ModuleContext::new(&burrow::Settings::default())?;
        MODULES.iter().try_for_each(|r| r(registry, &ctx))
    }

    #[test]
    fn every_module_registers_and_names_are_unique() {
        let mut registry = Registry::new();
        register(&mut registry).expect("handler modules register cleanly");
        assert!(!registry.is_empty());
        assert!(
            registry
                .binding_keys()
                .contains(&"CardAddedToLibraryEvent".to_string())
        );
        // Registering the same modules twice is caught at start, not at the first message.
        assert!(register(&mut registry).is_err());
    }

    #[test]
    fn every_sample_event_has_a_handler() {
        let mut registry = Registry::new();
        register(&mut registry).unwrap();
        for (event_type, body) in samples() {
            assert!(
                registry.subscribed_to(event_type).next().is_some(),
                "{event_type}"
            );
            assert!(body.is_object());
        }
    }
}

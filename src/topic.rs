//! Topic-exchange matching, the same rules RabbitMQ applies to bindings
//! (<https://www.rabbitmq.com/docs/exchanges#topic>): keys are words split by
//! `.`; in a binding key `*` matches exactly one word and `#` zero or more.
//!
//! The consumer needs it to pick the handlers a delivery is for: the broker
//! tells us which queue a message came from, not which binding matched.

/// Whether `routing_key` matches the binding `pattern`.
pub(crate) fn matches(pattern: &str, routing_key: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = routing_key.split('.').collect();
    matches_words(&pattern, &key)
}

fn matches_words(pattern: &[&str], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((&"#", rest)) => (0..=key.len()).any(|skip| matches_words(rest, &key[skip..])),
        Some((&word, rest)) => match key.split_first() {
            Some((&k, key_rest)) if word == "*" || word == k => matches_words(rest, key_rest),
            _ => false,
        },
    }
}

/// Checks a binding key: non-empty, at most 255 bytes, no empty words.
pub(crate) fn validate_binding_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("it is empty; use the event type, e.g. \"CardAddedToLibraryEvent\"".into());
    }
    if key.len() > 255 {
        return Err(format!("it is {} bytes; AMQP allows 255", key.len()));
    }
    if key.split('.').any(str::is_empty) {
        return Err("it has an empty word (leading, trailing or doubled '.')".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_wildcards() {
        assert!(matches(
            "CardAddedToLibraryEvent",
            "CardAddedToLibraryEvent"
        ));
        assert!(!matches(
            "CardAddedToLibraryEvent",
            "CollectionCreatedEvent"
        ));
        assert!(matches("#", "CollectionCreatedEvent"));
        assert!(matches("#", "a.b.c"));
        assert!(matches("card.*", "card.added"));
        assert!(!matches("card.*", "card.added.x"));
        assert!(!matches("card.*", "card"));
        assert!(matches("card.#", "card"));
        assert!(matches("card.#", "card.added.x"));
        assert!(matches("*.added.#", "card.added"));
        assert!(matches("a.#.z", "a.b.c.z"));
        assert!(!matches("a.#.z", "a.b.c"));
    }

    #[test]
    fn binding_keys_are_checked() {
        assert!(validate_binding_key("a.b").is_ok());
        assert!(validate_binding_key("").is_err());
        assert!(validate_binding_key("a..b").is_err());
        assert!(validate_binding_key(&"x".repeat(256)).is_err());
    }
}

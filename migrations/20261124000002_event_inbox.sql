-- burrow's idempotent inbox: one row per (handler, message) that was handled.
-- The row is inserted in the same transaction as the handler's own writes, so
-- either both are committed or neither is, and a redelivered message finds it.
CREATE TABLE IF NOT EXISTS event_inbox (
    handler      TEXT        NOT NULL,
    message_id   TEXT        NOT NULL,
    event_type   TEXT        NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (handler, message_id)
);

-- Retention cleanup.
CREATE INDEX IF NOT EXISTS event_inbox_processed_at ON event_inbox (processed_at);

-- burrow's transactional outbox: one row per domain event, written in the same
-- transaction as the aggregate that raised it, published by `burrow outbox relay`.
CREATE TABLE IF NOT EXISTS event_outbox (
    -- Enqueue order. Events of one aggregate leave in this order.
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The AMQP message_id (consumers de-duplicate on it) and correlation_id.
    message_id      TEXT        NOT NULL UNIQUE,
    correlation_id  TEXT        NOT NULL,
    -- The burrow-causation-id header, when the caller gave one.
    causation_id    TEXT,
    aggregate_id    TEXT        NOT NULL,
    -- The routing key, the AMQP `type` property and the burrow-event-version header.
    event_type      TEXT        NOT NULL,
    event_version   BIGINT      NOT NULL DEFAULT 1,
    -- The message body.
    payload         JSONB       NOT NULL,
    -- Further string headers sent with the message (W3C trace context, ...).
    headers         JSONB       NOT NULL DEFAULT '{}'::jsonb,
    -- When the event happened (the AMQP `timestamp` property).
    occurred_at     TIMESTAMPTZ NOT NULL,
    -- When the row was written; the relay's lag is measured from here.
    enqueued_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    -- Set once the broker confirmed the publish; NULL while pending.
    published_at    TIMESTAMPTZ,
    -- Publish attempts recorded (the successful one included) and the last failure.
    attempts        INTEGER     NOT NULL DEFAULT 0,
    last_error      TEXT,
    -- A failed row is not tried again before this time (backoff).
    next_attempt_at TIMESTAMPTZ
);

-- The relay's claim: pending rows per aggregate in order.
CREATE INDEX IF NOT EXISTS event_outbox_pending
    ON event_outbox (aggregate_id, id) WHERE published_at IS NULL;
-- The relay's scan for heads in enqueue order.
CREATE INDEX IF NOT EXISTS event_outbox_pending_id
    ON event_outbox (id) WHERE published_at IS NULL;
-- `burrow outbox audit <aggregate-id>`.
CREATE INDEX IF NOT EXISTS event_outbox_aggregate
    ON event_outbox (aggregate_id, id);
-- Retention cleanup.
CREATE INDEX IF NOT EXISTS event_outbox_published_at
    ON event_outbox (published_at) WHERE published_at IS NOT NULL;

-- Wake listening relays as soon as a transaction that enqueued events commits
-- (NOTIFY is delivered at commit, never for a rolled-back transaction). One
-- notification per statement; identical notifications of one transaction are
-- folded into one. The payload is the table's schema, so relays of other
-- schemas in the same database ignore it.
CREATE OR REPLACE FUNCTION burrow_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('burrow_outbox', TG_TABLE_SCHEMA);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS event_outbox_notify ON event_outbox;
CREATE TRIGGER event_outbox_notify
    AFTER INSERT ON event_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION burrow_outbox_notify();

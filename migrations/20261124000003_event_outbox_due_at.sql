-- Scheduled events (burrow::outbox::enqueue_at / enqueue_after): a row with a
-- due time is published once that time has come; a row without one (every
-- row written before this migration) is published as soon as it is
-- committed, as before.
ALTER TABLE event_outbox ADD COLUMN IF NOT EXISTS due_at TIMESTAMPTZ;

-- The relay's claim of due scheduled rows and its timer on the earliest one
-- still to come: pending scheduled rows by due time.
CREATE INDEX IF NOT EXISTS event_outbox_pending_due
    ON event_outbox (due_at) WHERE published_at IS NULL AND due_at IS NOT NULL;

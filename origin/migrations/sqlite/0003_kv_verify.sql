-- Keys whose value in Workers KV must be read back before the publisher can trust it: a write
-- of theirs had an unknown outcome (timed out or dropped after it was sent, or a 5xx), and such
-- a write may still be applied later, over a newer one. At `due_at` (unix ms) the publisher
-- reads the value and, if its revision is behind the database's, queues the key again.
CREATE TABLE kv_verify (
    key_id   TEXT    PRIMARY KEY NOT NULL,
    due_at   INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE INDEX kv_verify_by_due ON kv_verify (due_at);

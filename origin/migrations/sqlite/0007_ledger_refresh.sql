-- The edge's change ledger keeps an entry only for its retention (LEDGER_RETENTION_MS, ten
-- minutes by default), and a ledger entry outweighs an older KV value only while the ledger
-- holds it. If KV publishing is stuck for longer (an expired token, an API outage, 429 pauses),
-- a revocation's ledger entry would be pruned and isolates would fall back to KV's old value.
-- So while a key's change still waits for KV, the ledger publisher appends the key again every
-- few minutes; this table says when it last queued such a refresh. A row goes once the key
-- waits for KV no more.
CREATE TABLE ledger_refresh (
    key_id TEXT    PRIMARY KEY,
    at     INTEGER NOT NULL
) STRICT;

-- Rows of a KV rebuild (`origin sync --full`, every key) are not changes: a key waiting only for
-- such a row is not refreshed in the ledger (that would flood it with every key while KV is
-- down). Rows written before this migration count as changes.
ALTER TABLE kv_outbox ADD COLUMN rebuild INTEGER NOT NULL DEFAULT 0 CHECK (rebuild IN (0, 1));

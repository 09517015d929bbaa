-- The outbox feeds two sinks: Workers KV and the edge's change ledger (a Durable Object that
-- makes a revocation reach every isolate within seconds; shared/src/ledger). Each row says which
-- sinks still need it; a sink's publisher clears its own flag once that sink accepted the key's
-- state, and a row is deleted only when no sink needs it. So one sink being down never holds
-- the other back, and loses nothing.
--
-- Rows of key changes need both sinks. Rows that only repair KV (`origin sync --full`, a KV
-- read-back or reconciliation that found KV behind) are written with `ledger_pending = 0`.
-- Rows already waiting when this migration runs need both (they may be changes the ledger has
-- never seen).
ALTER TABLE kv_outbox ADD COLUMN kv_pending INTEGER NOT NULL DEFAULT 1 CHECK (kv_pending IN (0, 1));
ALTER TABLE kv_outbox ADD COLUMN ledger_pending INTEGER NOT NULL DEFAULT 1 CHECK (ledger_pending IN (0, 1));

-- Each sink's publisher reads the oldest rows it still needs.
CREATE INDEX kv_outbox_kv_pending ON kv_outbox (seq) WHERE kv_pending = 1;
CREATE INDEX kv_outbox_ledger_pending ON kv_outbox (seq) WHERE ledger_pending = 1;

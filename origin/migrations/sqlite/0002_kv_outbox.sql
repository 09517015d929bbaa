-- Changes waiting to reach Workers KV. A row is written in the same transaction as the key
-- change it announces, so an acknowledged change is never lost on its way to the edge; the
-- publisher deletes rows once the key's latest state is in KV. `seq` orders the drain.
CREATE TABLE kv_outbox (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id      TEXT    NOT NULL,
    enqueued_at INTEGER NOT NULL
) STRICT;

-- Acknowledging deletes every row of one key up to a sequence number.
CREATE INDEX kv_outbox_by_key ON kv_outbox (key_id, seq);

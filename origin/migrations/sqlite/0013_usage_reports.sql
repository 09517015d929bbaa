-- When origin last accepted a usage batch from the edge (origin's clock, unix ms). The stale-key
-- policy acts only while this is recent: without reports, keys used every day at the edge would
-- look idle. One row, kept for ever (usage_batches_seen forgets its rows within minutes).
CREATE TABLE usage_reports (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_accepted_at INTEGER NOT NULL
);

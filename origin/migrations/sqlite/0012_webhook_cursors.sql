-- Event webhooks: each endpoint's place in the audit log (the events are the audit entries, so
-- an event is durable exactly when its change is). `after_seq` is the last entry delivered (or
-- skipped as no event); delivery resumes after it, across restarts.
CREATE TABLE webhook_cursors (
    endpoint TEXT PRIMARY KEY,
    after_seq INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

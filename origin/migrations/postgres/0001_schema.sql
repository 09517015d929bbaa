-- Origin's schema on PostgreSQL: the tables of SQLite's fourteen migrations (../sqlite/) as
-- they stand after the last of them, with PostgreSQL's types. Times are unix milliseconds
-- (BIGINT); JSON is kept as the text origin wrote (the audit chain MACs `details` byte for
-- byte), cast to JSONB only where a query looks inside it. The secret is never stored: only
-- its SHA-256 (`secret_hash`, verify's lookup) and a display hint.

CREATE TABLE api_keys (
    -- Ordered byte by byte, as SQLite orders text (and as origin pages through keys by id),
    -- whatever the database's collation.
    id                TEXT     COLLATE "C" PRIMARY KEY NOT NULL,
    secret_hash       BYTEA    NOT NULL UNIQUE CHECK (length(secret_hash) = 32),
    hint              TEXT     NOT NULL,
    name              TEXT     NOT NULL,
    subject           TEXT     NOT NULL,
    description       TEXT,
    scopes            TEXT     NOT NULL,             -- JSON array of strings, sorted
    claims            TEXT,                          -- JSON object, or NULL
    created_by        TEXT,
    expiration        BIGINT,
    revoked           BOOLEAN  NOT NULL DEFAULT false,
    revoked_at        BIGINT,
    revocation_reason TEXT,
    last_used_at      BIGINT,
    created_at        BIGINT   NOT NULL,
    updated_at        BIGINT   NOT NULL,
    revision          BIGINT   NOT NULL DEFAULT 1,   -- bumped by every change; optimistic locking
    disabled          BOOLEAN  NOT NULL DEFAULT false,
    allowed_ips       TEXT,                          -- JSON array, or NULL for none
    rolled_from       TEXT,
    rolled_to         TEXT,
    leaked_at         BIGINT,
    leak_source       TEXT,
    key_type          TEXT     NOT NULL DEFAULT 'api_key',
    deleted_at        BIGINT
);

-- Lists are newest first, of live keys (a deleted key is never listed), usually for one
-- subject; the count of a page reads the same index.
CREATE INDEX api_keys_live_by_subject ON api_keys (subject, created_at DESC, id DESC)
    WHERE deleted_at IS NULL;
CREATE INDEX api_keys_live_by_created ON api_keys (created_at DESC, id DESC)
    WHERE deleted_at IS NULL;
-- A metadata filter (`claims.<field>=<value>`) is a containment test on the claims as JSONB.
CREATE INDEX api_keys_live_by_claims ON api_keys USING GIN ((claims::jsonb) jsonb_path_ops)
    WHERE deleted_at IS NULL;
-- A key is rolled at most once: a second successor is refused even from another replica.
CREATE UNIQUE INDEX api_keys_rolled_from ON api_keys (rolled_from) WHERE rolled_from IS NOT NULL;
-- `origin sync --full` and the full reconciliation walk keys by id (the primary key); the
-- ledger's catch-up reads keys changed since a time.
CREATE INDEX api_keys_by_updated ON api_keys (updated_at);

-- Append-only, hash-chained audit log (origin/src/audit.rs): each entry's `hash` is an
-- HMAC-SHA256 over its content and the previous entry's hash. Replicas append one at a time
-- (a transaction-level advisory lock), and `seq` and `prev_hash` being unique means two
-- writers that raced could never both extend the same entry.
CREATE TABLE audit_log (
    seq       BIGINT   PRIMARY KEY NOT NULL CHECK (seq > 0),
    at        BIGINT   NOT NULL,
    actor     TEXT     NOT NULL,
    action    TEXT     NOT NULL,
    key_id    TEXT,
    details   TEXT     NOT NULL,   -- JSON; never a secret
    prev_hash TEXT     NOT NULL UNIQUE,
    hash      TEXT     NOT NULL,
    chain     BIGINT   NOT NULL DEFAULT 2 CHECK (chain IN (1, 2))
);

CREATE INDEX audit_log_by_key ON audit_log (key_id, seq);
CREATE INDEX audit_log_by_action ON audit_log (action, key_id, at);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END;
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- Changes waiting for the sinks (Workers KV, the edge's change ledger), written in the
-- transaction of the change they announce. Each row says which sinks still need it; a row goes
-- when none does. Rows are numbered under the same advisory lock as the audit log's appends,
-- so `seq` order is commit order across replicas.
CREATE TABLE kv_outbox (
    seq            BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_id         TEXT    NOT NULL,
    enqueued_at    BIGINT  NOT NULL,
    kv_pending     BOOLEAN NOT NULL DEFAULT true,
    ledger_pending BOOLEAN NOT NULL DEFAULT true,
    rebuild        BOOLEAN NOT NULL DEFAULT false
);

CREATE INDEX kv_outbox_by_key ON kv_outbox (key_id, seq);
CREATE INDEX kv_outbox_kv_pending ON kv_outbox (seq) WHERE kv_pending;
CREATE INDEX kv_outbox_ledger_pending ON kv_outbox (seq) WHERE ledger_pending;

-- Keys whose value in Workers KV must be read back (a write with an unknown outcome).
CREATE TABLE kv_verify (
    key_id   TEXT   PRIMARY KEY NOT NULL,
    due_at   BIGINT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX kv_verify_by_due ON kv_verify (due_at);

-- When the ledger publisher last re-appended a key still waiting for KV.
CREATE TABLE ledger_refresh (
    key_id TEXT   PRIMARY KEY,
    at     BIGINT NOT NULL
);

-- Usage batches already accepted, by their 32-byte HMAC, until they leave the skew window: a
-- replay is refused by whichever replica it reaches.
CREATE TABLE usage_batches_seen (
    mac   BYTEA  PRIMARY KEY NOT NULL CHECK (length(mac) = 32),
    until BIGINT NOT NULL
);

CREATE INDEX usage_batches_seen_by_until ON usage_batches_seen (until);

-- Each webhook endpoint's place in the audit log.
CREATE TABLE webhook_cursors (
    endpoint   TEXT   PRIMARY KEY,
    after_seq  BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- When origin last accepted a usage batch (one row).
CREATE TABLE usage_reports (
    id               INTEGER PRIMARY KEY CHECK (id = 1),
    last_accepted_at BIGINT  NOT NULL
);

-- Keys. The secret is never stored: only its SHA-256 (`secret_hash`, the lookup index) and a
-- display hint. Times are unix milliseconds.
CREATE TABLE api_keys (
    id                TEXT    PRIMARY KEY NOT NULL,
    secret_hash       BLOB    NOT NULL UNIQUE CHECK (length(secret_hash) = 32),
    hint              TEXT    NOT NULL,
    name              TEXT    NOT NULL,
    subject           TEXT    NOT NULL,
    description       TEXT,
    scopes            TEXT    NOT NULL,            -- JSON array of strings, sorted
    claims            TEXT,                        -- JSON object, or NULL
    created_by        TEXT,
    expiration        INTEGER,
    revoked           INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
    revoked_at        INTEGER,
    revocation_reason TEXT,
    last_used_at      INTEGER,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    revision          INTEGER NOT NULL DEFAULT 1   -- bumped by every change; optimistic locking
) STRICT;

-- Listing is newest first, usually for one subject.
CREATE INDEX api_keys_by_subject ON api_keys (subject, created_at DESC, id DESC);
CREATE INDEX api_keys_by_created ON api_keys (created_at DESC, id DESC);

-- Append-only, hash-chained audit log: each row's `hash` covers its content and the previous
-- row's hash, so editing or deleting a row breaks the chain (`origin audit verify`).
CREATE TABLE audit_log (
    seq       INTEGER PRIMARY KEY NOT NULL,
    at        INTEGER NOT NULL,
    actor     TEXT    NOT NULL,
    action    TEXT    NOT NULL,
    key_id    TEXT,
    details   TEXT    NOT NULL,   -- JSON; never a secret
    prev_hash TEXT    NOT NULL,
    hash      TEXT    NOT NULL
) STRICT;

CREATE INDEX audit_log_by_key ON audit_log (key_id, seq);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;

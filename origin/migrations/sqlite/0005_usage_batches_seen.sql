-- Usage batches (POST /v1/usage) already accepted, by their decoded 32-byte HMAC: the MAC
-- covers the timestamp and the body, so it names what was signed, however the header spelled
-- it. A row matters until its timestamp leaves the skew window (`until`); older rows are
-- deleted as new batches arrive. Kept in the database so a replay is refused after a restart.
CREATE TABLE usage_batches_seen (
    mac   BLOB    PRIMARY KEY NOT NULL CHECK (length(mac) = 32),
    until INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE INDEX usage_batches_seen_by_until ON usage_batches_seen (until);

-- A metadata filter (`claims.<field>=<value>`) reads the claims as JSONB, parsed once when the
-- key is written (`claims_jsonb`) instead of from the text on every row a list looks at (the
-- index's candidates are rechecked, and each page is sorted and counted from them).
--
-- The index is written at once on every insert, not through GIN's pending list: a list would
-- otherwise read the whole unmerged list (every key inserted since the last vacuum, unindexed)
-- on each request; a page over a freshly copied database (`origin migrate-store`) took hundreds
-- of milliseconds instead of one. Keys are created far less often than they are listed.
ALTER TABLE api_keys ADD COLUMN claims_jsonb JSONB GENERATED ALWAYS AS (claims::jsonb) STORED;
DROP INDEX api_keys_live_by_claims;
CREATE INDEX api_keys_live_by_claims ON api_keys USING GIN (claims_jsonb jsonb_path_ops)
    WITH (fastupdate = off) WHERE deleted_at IS NULL;

-- Version 2 of the audit chain. Until now each entry's `hash` was an unkeyed SHA-256, which
-- anyone who can write this file can recompute after an edit. From now on entries are written
-- with chain version 2: `hash` is an HMAC-SHA256 keyed with AUDIT_CHAIN_KEY, a secret that is
-- never stored here (origin/src/audit.rs). Entries written before keep version 1 and are
-- reported as unkeyed by `origin audit verify`; the first keyed entry chains onto them.
ALTER TABLE audit_log ADD COLUMN chain INTEGER NOT NULL DEFAULT 1 CHECK (chain IN (1, 2));

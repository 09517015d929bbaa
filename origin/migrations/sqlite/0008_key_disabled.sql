-- Disable and enable: a reversible switch, distinct from revocation (which stays final).
ALTER TABLE api_keys ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;

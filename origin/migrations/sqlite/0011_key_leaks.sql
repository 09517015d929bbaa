-- Leaks: when a key was reported as leaked (by GitHub secret scanning or an admin), and where.
ALTER TABLE api_keys ADD COLUMN leaked_at INTEGER;
ALTER TABLE api_keys ADD COLUMN leak_source TEXT;

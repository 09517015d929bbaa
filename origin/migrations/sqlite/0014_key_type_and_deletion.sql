-- Clerk's key `type` (3 to 25 characters; `api_key` unless the creator says otherwise), and
-- deletion: a deleted key is revoked and hidden from every list and read by id, while its row
-- (the secret's hash, so it can never verify again) and its audit entries stay.
ALTER TABLE api_keys ADD COLUMN key_type TEXT NOT NULL DEFAULT 'api_key';
ALTER TABLE api_keys ADD COLUMN deleted_at INTEGER;

-- Per-key IP allowlists: a JSON array of addresses and CIDR ranges, NULL for none.
ALTER TABLE api_keys ADD COLUMN allowed_ips TEXT;

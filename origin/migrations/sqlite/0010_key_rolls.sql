-- Rolls: a key issued to replace another names it (rolled_from), and the key it replaced names
-- its successor (rolled_to). A key is rolled at most once: the unique index refuses a second
-- successor even from another process.
ALTER TABLE api_keys ADD COLUMN rolled_from TEXT;
ALTER TABLE api_keys ADD COLUMN rolled_to TEXT;
CREATE UNIQUE INDEX api_keys_rolled_from ON api_keys (rolled_from) WHERE rolled_from IS NOT NULL;

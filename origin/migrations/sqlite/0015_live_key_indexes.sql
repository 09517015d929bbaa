-- Lists never show a deleted key (0014), so their page and count read live keys: partial
-- indexes over live keys serve both, by subject and by creation, without reading rows.
CREATE INDEX api_keys_live_by_subject ON api_keys (subject, created_at DESC, id DESC)
    WHERE deleted_at IS NULL;
CREATE INDEX api_keys_live_by_created ON api_keys (created_at DESC, id DESC)
    WHERE deleted_at IS NULL;

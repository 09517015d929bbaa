//! Seeds a benchmark database: origin's own schema (its migrations run first), then `n` keys
//! written in bulk. Keys come from a fixed generator, so a run knows a valid secret without
//! storing any; subjects spread the keys evenly over [`SUBJECTS`] partners.
//!
//! Bulk rows skip what a one-by-one create also writes (audit entries, outbox rows): neither is
//! read by the benchmarked calls, and writing 1,000,000 hash-chained audit entries would only
//! make seeding slower. One genuine, keyed audit entry (a `seed` note) is written so that origin
//! starts: it refuses a database whose keys have an empty audit log (a wiped log). `origin audit
//! verify` would still name the seeded keys as having no create entry, as it should.

use std::path::Path;

use latchkey_origin::audit::{CHAIN_KEYED, EntryFields, GENESIS_HASH, entry_mac};
use latchkey_origin::store::{KeyStore, SqliteStore};
use latchkey_shared::sign::SigningSecret;
use latchkey_shared::{
    ApiKey, KeyId, KeyPrefix, KeyRecord, RECORD_VERSION, ScopePolicy, kv_entry_name,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, QueryBuilder, Sqlite, SqliteConnection};

/// The audit chain key origin runs with in the benchmarks.
pub(crate) const AUDIT_CHAIN_KEY: &str = "bench-audit-chain-key-00000000000000000";

/// The metadata tier one key in [`RARE_EVERY`] has (`claims.tier`); the others are `standard`.
pub(crate) const RARE_TIER: &str = "gold";
/// How rare [`RARE_TIER`] is.
pub(crate) const RARE_EVERY: u64 = 1000;

/// Partners the keys are spread over.
pub(crate) const SUBJECTS: u64 = 10_000;

/// What the benchmark needs from the seeded database.
pub(crate) struct Seeded {
    /// A valid key's secret.
    pub(crate) secret: String,
    /// A subject with `n / SUBJECTS` keys.
    pub(crate) subject: String,
    /// That key's KV entry name and record (for the edge).
    pub(crate) record_name: String,
    pub(crate) record_json: String,
}

/// A deterministic byte source (xorshift64*), standing in for the OS RNG.
struct Source(u64);

impl Source {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            *b = (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8;
        }
    }
}

pub(crate) fn seed(db: &Path, n: u64) -> Seeded {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let url = format!("sqlite://{}", db.display());
        // Origin's migrations, exactly as origin runs them.
        SqliteStore::open(&url, None)
            .await
            .expect("open")
            .close()
            .await;
        let mut conn = bulk_connection(&url).await;
        let mut source = Source(0x9e37_79b9_7f4a_7c15);
        let prefix = KeyPrefix::default();
        let scopes = ScopePolicy::default()
            .parse_grants(&["read:orders", "write:orders"])
            .expect("scopes");
        let scopes_json = serde_json::to_string(&scopes).expect("json");
        let base = 1_760_000_000_000i64;
        let mut first: Option<(String, KeyId)> = None;
        let mut sqlx_tx = conn.begin().await.expect("begin");
        let chunk = 500u64;
        let mut i = 0u64;
        while i < n {
            let end = (i + chunk).min(n);
            let mut rows = Vec::with_capacity(usize::try_from(end - i).expect("chunk"));
            for j in i..end {
                let secret = ApiKey::generate(&prefix, &mut |b| source.fill(b));
                let id = KeyId::generate(&mut |b| source.fill(b));
                if first.is_none() {
                    first = Some((secret.expose().to_owned(), id.clone()));
                }
                rows.push((j, secret.hash(), secret.hint().as_str().to_owned(), id));
            }
            let mut qb: QueryBuilder<'_, Sqlite> = QueryBuilder::new(
                "INSERT INTO api_keys (id, secret_hash, hint, name, subject, scopes, claims, \
                 revoked, created_at, updated_at, revision) ",
            );
            qb.push_values(&rows, |mut b, (j, hash, hint, id)| {
                let at = base + i64::try_from(*j).expect("index");
                b.push_bind(id.as_str().to_owned())
                    .push_bind(hash.as_bytes().to_vec())
                    .push_bind(hint.clone())
                    .push_bind(format!("bench key {j}"))
                    .push_bind(format!("partner-{}", j % SUBJECTS))
                    .push_bind(scopes_json.clone())
                    .push_bind(if j % RARE_EVERY == 0 {
                        format!(r#"{{"tier":"{RARE_TIER}"}}"#)
                    } else {
                        r#"{"tier":"standard"}"#.to_owned()
                    })
                    .push_bind(false)
                    .push_bind(at)
                    .push_bind(at)
                    .push_bind(1i64);
            });
            qb.build().execute(&mut *sqlx_tx).await.expect("insert");
            i = end;
        }
        let details = format!(r#"{{"seeded_keys":{n}}}"#);
        let fields = EntryFields {
            prev_hash: GENESIS_HASH,
            seq: 1,
            at: base,
            actor: "bench:seed",
            action: "seed",
            key_id: None,
            details_json: &details,
        };
        let key = SigningSecret::parse(AUDIT_CHAIN_KEY).expect("the bench's chain key");
        sqlx::query(
            "INSERT INTO audit_log (seq, at, actor, action, key_id, details, prev_hash, hash, chain) \
             VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?)",
        )
        .bind(fields.seq)
        .bind(fields.at)
        .bind(fields.actor)
        .bind(fields.action)
        .bind(&details)
        .bind(GENESIS_HASH)
        .bind(entry_mac(&key, &fields))
        .bind(CHAIN_KEYED)
        .execute(&mut *sqlx_tx)
        .await
        .expect("audit entry");
        sqlx_tx.commit().await.expect("commit");
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut conn)
            .await
            .expect("checkpoint");
        conn.close().await.expect("close");

        let (secret, id) = first.expect("at least one key");
        let key = ApiKey::parse(&secret).expect("key");
        let record = KeyRecord {
            v: RECORD_VERSION,
            id,
            subject: "partner-0".into(),
            scopes,
            revoked: false,
            revoked_at: None,
            expires_at: None,
            revision: 1,
            disabled: false,
            allowed_ips: Default::default(),
        };
        Seeded {
            record_name: kv_entry_name(&key.hash()),
            record_json: record.to_json(),
            secret,
            subject: format!("partner-{}", SUBJECTS / 2),
        }
    })
}

/// Queues the first `n` keys of the database for KV alone, as `origin sync --full` does (rows
/// of a rebuild: origin does not re-send them to the ledger at start, as it re-sends keys
/// whose own changes wait for KV): a KV backlog whose every row the open routes count.
pub(crate) fn queue_for_kv(db: &Path, n: u64) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut conn = bulk_connection(&format!("sqlite://{}", db.display())).await;
        sqlx::query(
            "INSERT INTO kv_outbox (key_id, enqueued_at, kv_pending, ledger_pending, rebuild) \
             SELECT id, updated_at, 1, 0, 1 FROM api_keys ORDER BY rowid LIMIT ?",
        )
        .bind(i64::try_from(n).expect("count"))
        .execute(&mut conn)
        .await
        .expect("queue for KV");
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut conn)
            .await
            .expect("checkpoint");
        conn.close().await.expect("close");
    });
}

/// A connection for writing in bulk: WAL, and no sync per commit (a benchmark's data, made
/// again at every run).
async fn bulk_connection(url: &str) -> SqliteConnection {
    let options = url
        .parse::<SqliteConnectOptions>()
        .expect("url")
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Off);
    SqliteConnection::connect_with(&options)
        .await
        .expect("connect")
}

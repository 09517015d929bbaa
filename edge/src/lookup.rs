//! One key check at the edge: parse, read the KV record, decide. Counts its KV reads and
//! remembers which keys passed, for the usage report.

use latchkey_shared::{
    KeyId, KeyRecord, Scope, UnixMillis, Verdict, decide, kv_entry_name, parse_presented,
};
use worker::{Date, Env};

/// The KV namespace binding named in `wrangler.toml`.
pub(crate) const KV_BINDING: &str = "KEYS";

/// KV could not be read, or held a record this build cannot read: the caller must deny
/// (fail closed), never allow.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unavailable {
    #[error("KV read failed: {0}")]
    Kv(String),
    #[error("the KV record for key {0} is unreadable: {1}")]
    Record(String, String),
}

/// The per-request view of KV.
pub(crate) struct Lookup<'a> {
    env: &'a Env,
    now: UnixMillis,
    kv_reads: u32,
    used: Vec<KeyId>,
}

impl<'a> Lookup<'a> {
    pub(crate) fn new(env: &'a Env) -> Self {
        let now = i64::try_from(Date::now().as_millis()).unwrap_or(i64::MAX);
        Self {
            env,
            now: UnixMillis(now),
            kv_reads: 0,
            used: Vec::new(),
        }
    }

    /// The request's time: one reading of the clock per request.
    pub(crate) fn now(&self) -> UnixMillis {
        self.now
    }

    /// How many KV reads this request made.
    pub(crate) fn kv_reads(&self) -> u32 {
        self.kv_reads
    }

    /// The keys that verified successfully in this request.
    pub(crate) fn used_keys(&self) -> &[KeyId] {
        &self.used
    }

    /// Verifies `presented` against `required`. A presented string that is not a well-formed
    /// key (syntax, length or checksum) is `Malformed` without touching KV.
    pub(crate) async fn verify(
        &mut self,
        presented: &str,
        required: &[Scope],
    ) -> Result<(Verdict, Option<KeyRecord>), Unavailable> {
        let key = match parse_presented(presented) {
            Ok(key) => key,
            Err(verdict) => return Ok((verdict, None)),
        };
        let kv = self
            .env
            .kv(KV_BINDING)
            .map_err(|e| Unavailable::Kv(e.to_string()))?;
        self.kv_reads += 1;
        let bytes = kv
            .get(&kv_entry_name(&key.hash()))
            .bytes()
            .await
            .map_err(|e| Unavailable::Kv(e.to_string()))?;
        let record = bytes
            .map(|b| KeyRecord::from_json(&b))
            .transpose()
            .map_err(|e| Unavailable::Record(key.hint().as_str().to_owned(), e.to_string()))?;
        let verdict = decide(record.as_ref(), self.now, required);
        if let (true, Some(record)) = (verdict.is_valid(), &record) {
            self.used.push(record.id.clone());
        }
        Ok((verdict, record))
    }
}

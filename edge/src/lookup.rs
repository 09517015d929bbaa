//! One key check at the edge: parse, recall the record from the isolate's memory or read it
//! from KV, decide. Counts its KV reads and remembers which keys passed, for the usage report.
//!
//! With a ledger (`LEDGER_SIGNING_SECRET` set), memory answers while the ledger proves it
//! complete (`memory.rs`); otherwise, or while memory is not trusted, every check reads KV, and
//! a ledger entry newer than KV's value still wins.

use std::net::IpAddr;
use std::rc::Rc;

use latchkey_shared::ledger::memory::Recall;
use latchkey_shared::{
    ApiKey, DecisionContext, KeyId, KeyRecord, Scope, UnixMillis, Verdict, decide, kv_entry_name,
    parse_presented,
};
use worker::{Context, Env};

use crate::config::{Config, LedgerSettings};
use crate::{ledger, memory};

/// The KV namespace binding named in `wrangler.toml`.
pub(crate) const KV_BINDING: &str = "KEYS";

/// The key's state could not be established: the caller must deny (fail closed), never allow.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unavailable {
    #[error("KV read failed: {0}")]
    Kv(String),
    #[error("the KV record for key {0} is unreadable: {1}")]
    Record(String, String),
    /// `LEDGER_STRICT`: memory is not trusted, and KV alone is not enough.
    #[error("the ledger cannot prove this isolate's memory complete (strict mode)")]
    Ledger,
}

impl Unavailable {
    /// The error code and message for the client (503).
    pub(crate) fn reply(&self) -> (&'static str, &'static str) {
        match self {
            Self::Kv(_) | Self::Record(..) => {
                ("kv_unavailable", "the key store cannot be read; try again")
            }
            Self::Ledger => (
                "ledger_unavailable",
                "the edge cannot confirm the key's current state; try again",
            ),
        }
    }
}

/// Where this request's record came from (the debug header `x-latchkey-debug-memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// No key was looked up (garbage, or the request did not get that far).
    None,
    /// No ledger: KV, as always.
    Off,
    /// Memory answered.
    Hit,
    /// Memory was trusted but did not hold the key: KV, then remembered.
    Miss,
    /// Memory was not trusted: KV, merged with ledger entries.
    Untrusted,
}

impl Source {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Off => "off",
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Untrusted => "untrusted",
        }
    }
}

/// The per-request view of memory and KV.
pub(crate) struct Lookup<'a> {
    env: &'a Env,
    ctx: &'a Context,
    ledger: Option<&'a LedgerSettings>,
    now: UnixMillis,
    kv_reads: u32,
    used: Vec<KeyId>,
    source: Source,
    /// `DEBUG_HEADERS`: whether to keep [`Self::trust_ages`].
    debug: bool,
    /// For an answer from trusted memory: the sync's and the watermark's ages when it was
    /// given (only with `DEBUG_HEADERS`).
    trust_ages: Option<(Option<i64>, Option<i64>)>,
}

impl<'a> Lookup<'a> {
    pub(crate) fn new(env: &'a Env, ctx: &'a Context, config: &'a Config) -> Self {
        Self {
            env,
            ctx,
            ledger: config.ledger.as_ref(),
            now: ledger::now(),
            kv_reads: 0,
            used: Vec::new(),
            source: Source::None,
            debug: config.debug_headers,
            trust_ages: None,
        }
    }

    /// For an answer from trusted memory (`hit` or `miss`), the ages of the sync and of the
    /// watermark that trusted it (only with `DEBUG_HEADERS`).
    pub(crate) fn trust_ages(&self) -> Option<(Option<i64>, Option<i64>)> {
        self.trust_ages
    }

    /// The request's time: one reading of the clock per request.
    pub(crate) fn now(&self) -> UnixMillis {
        self.now
    }

    /// How many KV reads this request made.
    pub(crate) fn kv_reads(&self) -> u32 {
        self.kv_reads
    }

    /// Where the record came from.
    pub(crate) fn source(&self) -> Source {
        self.source
    }

    /// The keys that verified successfully in this request.
    pub(crate) fn used_keys(&self) -> &[KeyId] {
        &self.used
    }

    /// Verifies `presented` against `required`, used from the address `client` gives (if
    /// known; asked only of a key with an IP allowlist, so other requests pay nothing for it).
    /// A presented string that is not a well-formed key (syntax, length or checksum) is
    /// `Malformed` without touching memory or KV.
    pub(crate) async fn verify(
        &mut self,
        presented: &str,
        required: &[Scope],
        client: impl FnOnce() -> Option<IpAddr>,
    ) -> Result<(Verdict, Option<Rc<KeyRecord>>), Unavailable> {
        let key = match parse_presented(presented) {
            Ok(key) => key,
            Err(verdict) => return Ok((verdict, None)),
        };
        let name = kv_entry_name(&key.hash());
        let record = match self.ledger {
            None => {
                self.source = Source::Off;
                self.read_kv(&name, &key).await?.map(Rc::new)
            }
            Some(settings) => self.recall(settings, &name, &key).await?,
        };
        let client = record
            .as_deref()
            .filter(|r| !r.allowed_ips.is_empty())
            .and_then(|_| client());
        let verdict = decide(
            record.as_deref(),
            &DecisionContext::at(self.now)
                .requiring(required)
                .from_address(client),
        );
        if let (true, Some(record)) = (verdict.is_valid(), &record) {
            self.used.push(record.id.clone());
        }
        Ok((verdict, record))
    }

    async fn recall(
        &mut self,
        settings: &'a LedgerSettings,
        name: &str,
        key: &ApiKey,
    ) -> Result<Option<Rc<KeyRecord>>, Unavailable> {
        let now = self.now;
        let (due, trusted) = memory::with(settings, |m| (m.start_sync(now), m.trusted(now)));
        let mut asked_at = now;
        if let Some(after) = due {
            if trusted {
                // Nobody waits for it, and it starts now, not after this request's answer
                // (a gateway request may take long upstream).
                let (env, settings) = (self.env.clone(), settings.clone());
                self.ctx
                    .wait_until(async move { memory::sync(env, &settings, after).await });
            } else {
                memory::sync_waiting(self.env.clone(), settings, after).await;
                asked_at = ledger::now();
            }
        }
        let (recalled, ages) = memory::with(settings, |m| {
            let recalled = m.recall(name, asked_at);
            let ages = self.debug.then(|| m.trust_ages(asked_at));
            (recalled, ages)
        });
        if !matches!(recalled, Recall::Untrusted) {
            self.trust_ages = ages;
        }
        match recalled {
            Recall::Known(record) => {
                self.source = Source::Hit;
                Ok(record)
            }
            Recall::Unknown => {
                self.source = Source::Miss;
                let kv = self.read_kv(name, key).await?;
                Ok(memory::with(settings, |m| {
                    m.remember(name, kv, ledger::now())
                }))
            }
            Recall::Untrusted => {
                self.source = Source::Untrusted;
                if settings.strict {
                    return Err(Unavailable::Ledger);
                }
                let kv = self.read_kv(name, key).await?;
                Ok(memory::with(settings, |m| m.merge(name, kv)))
            }
        }
    }

    /// The record KV holds under `name` (`key`'s entry). `key`'s hint is made only if the
    /// record is unreadable, to name the key in the error.
    async fn read_kv(
        &mut self,
        name: &str,
        key: &ApiKey,
    ) -> Result<Option<KeyRecord>, Unavailable> {
        let kv = self
            .env
            .kv(KV_BINDING)
            .map_err(|e| Unavailable::Kv(e.to_string()))?;
        self.kv_reads += 1;
        let bytes = kv
            .get(name)
            .bytes()
            .await
            .map_err(|e| Unavailable::Kv(e.to_string()))?;
        bytes
            .map(|b| KeyRecord::from_json(&b))
            .transpose()
            .map_err(|e| Unavailable::Record(key.hint().as_str().to_owned(), e.to_string()))
    }
}

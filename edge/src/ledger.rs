//! The change ledger: one Durable Object (SQLite storage) holding an append-only,
//! sequence-numbered log of recent key-record changes, and the Worker route origin appends to.
//!
//! * `POST /v1/ledger/changes` (origin → Worker, [`append`]): an [`AppendBatch`] signed with
//!   `LEDGER_SIGNING_SECRET` over [`append_message`]; stale or bad signatures get 401, a replay
//!   (the same MAC again) 409, and so does a late append (`superseded`: signed at or before
//!   the last append the object accepted, see `latchkey_shared::ledger::admit_append`). The
//!   Worker checks the signature, the object the replay and the order.
//! * Inside the object: `POST /append` appends, `GET /tail?after=N` answers every entry after
//!   `N` ([`Tail`]), `GET /tail?recent_ms=W` every entry appended in the last `W` ms (the
//!   shared poll of a location, see `memory.rs`).
//!
//! Invariants: sequence numbers are 1, 2, 3, … with no gaps and never reused (the head is kept
//! apart from the entries, so pruning everything does not restart them); entries older than the
//! retention window are pruned and `pruned_through` names the last one pruned, so a reader
//! whose cursor is older learns it missed entries; the watermark only moves forward; appends
//! are taken in the order origin signed them, and a key's `revision` never goes back (the
//! highest appended per KV entry name is kept in `revisions`, one row per key ever changed:
//! `latchkey_shared::ledger::admit_changes`).

use std::collections::HashMap;

use latchkey_shared::ledger::{
    APPEND_BODY_MAX_BYTES, AppendAnswer, AppendBatch, AppendRefusal, Entry, LEDGER_VERSION,
    TAIL_MAX_ENTRIES, Tail, admit_append, admit_changes, append_message,
};
use latchkey_shared::sign::{self, MAX_CLOCK_SKEW_MS};
use latchkey_shared::target::RequestTarget;
use latchkey_shared::{KeyRecord, UnixMillis};
use serde::Deserialize;
use worker::worker_sys::web_sys;
use worker::{
    DurableObject, Env, Headers, Method, Request, RequestInit, Response, Result, SqlStorage, State,
    durable_object,
};

use crate::body;
use crate::config::{DEFAULT_RETENTION_MS, Settings, retention_range};
use crate::reply;

/// The Durable Object binding named in `wrangler.toml`.
pub(crate) const LEDGER_BINDING: &str = "LEDGER";
/// The one ledger instance's name.
const INSTANCE: &str = "global";
/// The Worker → object header carrying the verified MAC (hex), the replay guard's key.
const MAC_HEADER: &str = "x-latchkey-ledger-mac";
/// Until when (ms) the MAC must be remembered: its timestamp plus the allowed skew.
const UNTIL_HEADER: &str = "x-latchkey-ledger-until";
/// The Worker → object header carrying the verified signature's timestamp (ms): appends are
/// taken in that order.
const SIGNED_AT_HEADER: &str = "x-latchkey-ledger-signed-at";
/// `POST /v1/ledger/changes`: checks the signature and the body, then appends in the object.
pub(crate) async fn append(
    req: web_sys::Request,
    env: &Env,
    config: &Settings,
    now: UnixMillis,
) -> Result<web_sys::Response> {
    let Some(secret) = &config.ledger_secret else {
        return reply::error(
            404,
            "ledger_disabled",
            "this edge has no ledger (LEDGER_SIGNING_SECRET is not set)",
        );
    };
    let Some(body) = body::read_capped(&req, APPEND_BODY_MAX_BYTES).await? else {
        return reply::error(413, "body_too_large", "the append body is too large");
    };
    let headers = Headers(req.headers());
    let verified = match sign::verify_signed(
        secret.as_bytes(),
        headers.get(sign::header::TIMESTAMP)?.as_deref(),
        headers.get(sign::header::SIGNATURE)?.as_deref(),
        now,
        |timestamp| append_message(timestamp, &body),
    ) {
        Ok(verified) => verified,
        Err(e) => return reply::error(401, "bad_signature", &e.to_string()),
    };
    match AppendBatch::parse(&body) {
        Err(e) => return reply::error(400, "bad_ledger_batch", &e.to_string()),
        // Origin reads the watermark's time before it signs: a later one is not origin's (and
        // a watermark from the future would keep every isolate from trusting its memory).
        Ok(batch) if batch.watermark.is_some_and(|w| w > verified.timestamp) => {
            return reply::error(
                400,
                "bad_ledger_batch",
                "the watermark is later than the signature's timestamp",
            );
        }
        Ok(_) => {}
    }
    let inner = Headers::new();
    inner.set("content-type", "application/json")?;
    inner.set(MAC_HEADER, &hex(&verified.mac))?;
    inner.set(SIGNED_AT_HEADER, &verified.timestamp.0.to_string())?;
    inner.set(
        UNTIL_HEADER,
        &verified
            .timestamp
            .0
            .saturating_add(MAX_CLOCK_SKEW_MS)
            .to_string(),
    )?;
    let mut init = RequestInit::new();
    init.with_method(Method::Post)
        .with_headers(inner)
        .with_body(Some(js_sys::Uint8Array::from(body.as_slice()).into()));
    let request = Request::new_with_init("https://ledger/append", &init)?;
    match stub(env)?.fetch_with_request(request).await {
        Ok(response) => Ok(response.into()),
        Err(e) => {
            worker::console_error!("ledger append failed: {e}");
            reply::error(
                503,
                "ledger_unavailable",
                "the ledger cannot be reached; retry",
            )
        }
    }
}

/// The one ledger instance.
pub(crate) fn stub(env: &Env) -> Result<worker::Stub> {
    env.durable_object(LEDGER_BINDING)?
        .id_from_name(INSTANCE)?
        .get_stub()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The ledger object.
#[durable_object]
pub struct Ledger {
    sql: SqlStorage,
    retention_ms: i64,
}

impl DurableObject for Ledger {
    fn new(state: State, env: Env) -> Self {
        let sql = state.storage().sql();
        for statement in SCHEMA {
            if let Err(e) = sql.exec(statement, None) {
                worker::console_error!("ledger schema: {e}");
            }
        }
        // The Worker refuses a bad value loudly (config.rs); here it falls back to the default.
        let debug = env
            .var("DEBUG_HEADERS")
            .is_ok_and(|v| v.to_string() == "true");
        let retention_ms = env
            .var("LEDGER_RETENTION_MS")
            .ok()
            .and_then(|v| v.to_string().trim().parse::<i64>().ok())
            .filter(|ms| retention_range(debug).contains(ms))
            .unwrap_or(DEFAULT_RETENTION_MS);
        Self { sql, retention_ms }
    }

    async fn fetch(&self, mut req: Request) -> Result<Response> {
        let now = now();
        // The URL as the runtime holds it: `Request::url` would parse it again with the `url`
        // crate, whose IDNA tables were a third of the Worker's size.
        let url = req.inner().url();
        let Ok(target) = RequestTarget::from_url(&url) else {
            return Response::error("not found", 404);
        };
        let result = match (req.method(), target.path) {
            (Method::Post, "/append") => {
                let mac = req.headers().get(MAC_HEADER)?.unwrap_or_default();
                let sent_until = req
                    .headers()
                    .get(UNTIL_HEADER)?
                    .and_then(|v| v.parse::<i64>().ok());
                let until = sent_until.unwrap_or(now.0);
                // A Worker of the previous release (during a rollout) sends only the MAC's
                // deadline, which is the timestamp plus the skew.
                let signed_at = req
                    .headers()
                    .get(SIGNED_AT_HEADER)?
                    .and_then(|v| v.parse::<i64>().ok())
                    .or_else(|| sent_until.map(|u| u.saturating_sub(MAX_CLOCK_SKEW_MS)))
                    .map(UnixMillis);
                let body = req.bytes().await?;
                self.append(&mac, signed_at, until, &body, now)
            }
            (Method::Get, "/tail") => {
                let query = TailQuery::parse(target.query);
                self.tail(&query, now)
            }
            _ => Response::error("not found", 404),
        };
        result.or_else(|e| {
            worker::console_error!("ledger: {e}");
            Response::error("ledger error", 500)
        })
    }
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS entries (seq INTEGER PRIMARY KEY, at INTEGER NOT NULL, \
     name TEXT NOT NULL, record TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS entries_by_time ON entries (at)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS seen (mac TEXT PRIMARY KEY, until INTEGER NOT NULL)",
    // The highest revision appended per KV entry name, in decimal (a revision is a u64, and
    // integers cross to JavaScript as numbers, exact only below 2^53). Never pruned: one row
    // per key ever changed, so a key's revision never goes back, however late the older one.
    "CREATE TABLE IF NOT EXISTS revisions (name TEXT PRIMARY KEY, revision TEXT NOT NULL)",
];

#[derive(Debug, Default)]
struct TailQuery {
    after: Option<u64>,
    recent_ms: Option<i64>,
}

impl TailQuery {
    /// Parses `after=N` / `recent_ms=W` (anything else is ignored; a bad number is absent).
    fn parse(query: &str) -> Self {
        let mut parsed = Self::default();
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("after", v)) => parsed.after = v.parse().ok(),
                Some(("recent_ms", v)) => parsed.recent_ms = v.parse().ok(),
                _ => {}
            }
        }
        parsed
    }
}

#[derive(Deserialize)]
struct Row {
    seq: i64,
    at: i64,
    name: String,
    record: String,
}

#[derive(Deserialize)]
struct Value {
    value: Option<i64>,
}

#[derive(Deserialize)]
struct Revision {
    revision: String,
}

impl Ledger {
    /// A counter of the `meta` table, `None` if never set.
    fn meta_opt(&self, name: &str) -> Result<Option<i64>> {
        let rows: Vec<Value> = self
            .sql
            .exec("SELECT value FROM meta WHERE name = ?", vec![name.into()])?
            .to_array()?;
        Ok(rows.first().and_then(|r| r.value))
    }

    /// A counter of the `meta` table, 0 if never set.
    fn meta(&self, name: &str) -> Result<i64> {
        Ok(self.meta_opt(name)?.unwrap_or(0))
    }

    fn set_meta(&self, name: &str, value: i64) -> Result<()> {
        self.sql.exec(
            "INSERT INTO meta (name, value) VALUES (?, ?) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            vec![name.into(), value.into()],
        )?;
        Ok(())
    }

    /// The newest sequence number: never behind an entry, even after an append that failed
    /// half-way.
    fn head(&self) -> Result<i64> {
        let newest: Vec<Value> = self
            .sql
            .exec("SELECT MAX(seq) AS value FROM entries", None)?
            .to_array()?;
        Ok(self
            .meta("head")?
            .max(newest.first().and_then(|r| r.value).unwrap_or(0)))
    }

    /// This ledger's epoch, drawn when the object first runs (see `Tail::epoch`).
    fn epoch(&self) -> Result<i64> {
        if let Some(epoch) = self.meta_opt("epoch")? {
            return Ok(epoch);
        }
        // Not a secret, only different from any other ledger's: below 2^53 (a JS number).
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "Math.random() is in [0, 1): the product fits below 2^53"
        )]
        let epoch = (js_sys::Math::random() * 9.0e15) as i64 + 1;
        self.set_meta("epoch", epoch)?;
        Ok(epoch)
    }

    /// The highest revision appended for `name`, if any.
    fn highest_revision(&self, name: &str) -> Result<Option<u64>> {
        let rows: Vec<Revision> = self
            .sql
            .exec(
                "SELECT revision FROM revisions WHERE name = ?",
                vec![name.into()],
            )?
            .to_array()?;
        Ok(rows.first().and_then(|r| r.revision.parse().ok()))
    }

    /// Appends a verified batch (the Worker checked its signature): refuses a MAC seen before
    /// and an append signed no later than the last one accepted, leaves out changes older (by
    /// `revision`) than their key's last appended one, gives each other change the next
    /// sequence number, moves the watermark forward, prunes. Synchronous from the first read
    /// to the last write, so it is one atomic step.
    fn append(
        &self,
        mac: &str,
        signed_at: Option<UnixMillis>,
        until: i64,
        body: &[u8],
        now: UnixMillis,
    ) -> Result<Response> {
        let Ok(batch) = AppendBatch::parse(body) else {
            return Response::error("bad batch", 400);
        };
        if mac.len() != 64 {
            return Response::error("missing MAC", 400);
        }
        let Some(signed_at) = signed_at else {
            return Response::error("missing signature timestamp", 400);
        };
        self.sql
            .exec("DELETE FROM seen WHERE until < ?", vec![now.0.into()])?;
        let seen: Vec<Value> = self
            .sql
            .exec(
                "SELECT 1 AS value FROM seen WHERE mac = ?",
                vec![mac.into()],
            )?
            .to_array()?;
        if !seen.is_empty() {
            return Response::from_json(&serde_json::json!({
                "success": false,
                "error": { "code": "replayed", "message": "this append was accepted before" }
            }))
            .map(|r| r.with_status(409));
        }
        let last_accepted = self.meta_opt("last_signed_at")?.map(UnixMillis);
        if let Err(refusal) = admit_append(signed_at, last_accepted) {
            let AppendRefusal::Superseded { last_accepted, .. } = refusal;
            worker::console_warn!("ledger: {refusal}");
            return Response::from_json(&serde_json::json!({
                "success": false,
                "error": {
                    "code": "superseded",
                    "message": refusal.to_string(),
                    "last_signed_at": last_accepted,
                }
            }))
            .map(|r| r.with_status(409));
        }
        // Read before anything is written, so that a failed read fails the append whole.
        let mut highest: HashMap<&str, Option<u64>> = HashMap::new();
        for change in &batch.changes {
            if !highest.contains_key(change.name.as_str()) {
                highest.insert(&change.name, self.highest_revision(&change.name)?);
            }
        }
        let admitted = admit_changes(&batch.changes, |name| highest.get(name).copied().flatten());
        self.sql.exec(
            "INSERT INTO seen (mac, until) VALUES (?, ?)",
            vec![mac.into(), until.max(now.0).into()],
        )?;
        self.set_meta("last_signed_at", signed_at.0)?;
        let mut head = self.head()?;
        for change in &admitted.append {
            head += 1;
            self.sql.exec(
                "INSERT INTO entries (seq, at, name, record) VALUES (?, ?, ?, ?)",
                vec![
                    head.into(),
                    now.0.into(),
                    change.name.as_str().into(),
                    change.record.to_json().into(),
                ],
            )?;
            self.sql.exec(
                "INSERT INTO revisions (name, revision) VALUES (?, ?) \
                 ON CONFLICT (name) DO UPDATE SET revision = excluded.revision",
                vec![
                    change.name.as_str().into(),
                    change.record.revision.to_string().into(),
                ],
            )?;
        }
        self.set_meta("head", head)?;
        // Never later than this object's clock: a watermark vouches for the past only. The
        // stored one only moves forward, unless it is from this clock's future (both clocks
        // ran ahead, then stepped back): then the new one replaces it at once, so isolates
        // need not wait for the real time to pass it before they trust their memory again.
        if let Some(watermark) = batch.watermark.map(|w| w.0.min(now.0))
            && self.meta_opt("watermark")?.is_none_or(|w| {
                watermark > w
                    || latchkey_shared::ledger::memory::clock::age(UnixMillis(w), now).is_none()
            })
        {
            self.set_meta("watermark", watermark)?;
        }
        self.prune(now)?;
        if !admitted.superseded.is_empty() {
            worker::console_warn!(
                "ledger: {} change(s) left out, older than their key's last appended revision",
                admitted.superseded.len()
            );
        }
        Response::from_json(&AppendAnswer {
            v: LEDGER_VERSION,
            appended: admitted.append.len() as u64,
            head: u64::try_from(head).unwrap_or(0),
            superseded: admitted.superseded.len() as u64,
            epoch: Some(u64::try_from(self.epoch()?).unwrap_or(0)),
        })
    }

    /// Drops entries older than the retention window, remembering the last one dropped.
    fn prune(&self, now: UnixMillis) -> Result<()> {
        let horizon = now.0.saturating_sub(self.retention_ms);
        let last: Vec<Value> = self
            .sql
            .exec(
                "SELECT MAX(seq) AS value FROM entries WHERE at < ?",
                vec![horizon.into()],
            )?
            .to_array()?;
        if let Some(last) = last.first().and_then(|r| r.value) {
            self.sql
                .exec("DELETE FROM entries WHERE seq <= ?", vec![last.into()])?;
            if last > self.meta("pruned_through")? {
                self.set_meta("pruned_through", last)?;
            }
        }
        Ok(())
    }

    fn tail(&self, query: &TailQuery, now: UnixMillis) -> Result<Response> {
        let pruned_through = self.meta("pruned_through")?;
        let head = self.head()?;
        let after = match (query.after, query.recent_ms) {
            (Some(after), _) => i64::try_from(after).unwrap_or(i64::MAX),
            (None, Some(recent)) => {
                let older: Vec<Value> = self
                    .sql
                    .exec(
                        "SELECT MAX(seq) AS value FROM entries WHERE at < ?",
                        vec![now.0.saturating_sub(recent.max(0)).into()],
                    )?
                    .to_array()?;
                older.first().and_then(|r| r.value).unwrap_or(0)
            }
            (None, None) => 0,
        }
        .max(pruned_through)
        .min(head);
        let limit = i64::try_from(TAIL_MAX_ENTRIES).unwrap_or(1000);
        let rows: Vec<Row> = self
            .sql
            .exec(
                "SELECT seq, at, name, record FROM entries WHERE seq > ? ORDER BY seq LIMIT ?",
                vec![after.into(), limit.into()],
            )?
            .to_array()?;
        let mut entries = Vec::with_capacity(rows.len());
        for row in rows {
            let record = KeyRecord::from_json(row.record.as_bytes())
                .map_err(|e| worker::Error::RustError(format!("entry {}: {e}", row.seq)))?;
            entries.push(Entry {
                seq: u64::try_from(row.seq).unwrap_or(0),
                at: UnixMillis(row.at),
                name: row.name,
                record,
            });
        }
        let last = entries
            .last()
            .map_or(after, |e| i64::try_from(e.seq).unwrap_or(0));
        let watermark = self.meta_opt("watermark")?.map(UnixMillis);
        let tail = Tail {
            v: LEDGER_VERSION,
            after: u64::try_from(after).unwrap_or(0),
            entries,
            more: last < head,
            head: u64::try_from(head).unwrap_or(0),
            watermark,
            served_at: now,
            retention_ms: u64::try_from(self.retention_ms).unwrap_or(0),
            epoch: u64::try_from(self.epoch()?).unwrap_or(0),
        };
        let mut response = Response::ok(tail.to_json())?;
        response
            .headers_mut()
            .set("content-type", "application/json")?;
        Ok(response)
    }
}

/// The runtime's clock: `Date.now()`, one call, no `Date` object made (`worker::Date::now`
/// builds one and then reads it, two calls across the boundary on every request).
pub(crate) fn now() -> UnixMillis {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "whole milliseconds since 1970 in an f64, far inside i64's range (`as` saturates)"
    )]
    UnixMillis(js_sys::Date::now() as i64)
}

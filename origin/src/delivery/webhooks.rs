//! Event webhooks: key events delivered to the operator's endpoints, signed as Standard
//! Webhooks prescribes (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64
//! HMAC-SHA256>`).
//!
//! The events are the audit log's entries: a change and its audit entry commit together, so an
//! event is durable exactly when its change is, and nothing is written twice. Each endpoint has
//! a cursor in the database (`webhook_cursors`): its deliverer reads the entries after it, in
//! order, sends each one that is an event ([`event_type`]) until the endpoint answers 2xx, and
//! only then moves the cursor. A failed delivery is retried with backoff (the same event, so
//! delivery stays in order), across restarts and `kill -9`: delivery is at least once, and a
//! receiver drops repeats by `webhook-id`, which is the same on every attempt. A new endpoint
//! starts at the newest entry: history is not replayed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use latchkey_shared::{KeyId, UnixMillis};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::model::AuditEntry;
use crate::service::system_now;
use crate::store::lease::{Role, lost_lease};
use crate::store::{KeyStore, StoreError};

/// Audit actions that are events, and the event type each becomes (see [`event_type`]).
pub const EVENT_ACTIONS: &[&str] = &[
    "create",
    "update",
    "roll",
    "revoke",
    "leak",
    "delete",
    "expiry_warning",
    "stale_warning",
];

/// Audit entries read per round.
const PAGE: u32 = 100;
/// The first retry's wait; each failure in a row doubles it, up to `WEBHOOK_RETRY_MAX_MS`.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// How often a deliverer looks for entries when no commit wakes it (another process's changes).
const POLL: Duration = Duration::from_secs(5);

/// The event type of an audit entry, or `None` for an entry that is not an event (a refused
/// attempt). An update that switches a key off or on is `api_key.disabled` /
/// `api_key.enabled`; any other update is `api_key.updated`.
///
/// ```
/// use latchkey_origin::delivery::webhooks::event_type;
/// use serde_json::json;
///
/// assert_eq!(event_type("revoke", &json!({})), Some("api_key.revoked"));
/// assert_eq!(event_type("delete", &json!({"revoked": true})), Some("api_key.deleted"));
/// let off = json!({"changes": {"disabled": {"from": false, "to": true}}});
/// assert_eq!(event_type("update", &off), Some("api_key.disabled"));
/// assert_eq!(event_type("update", &json!({"changes": {}})), Some("api_key.updated"));
/// assert_eq!(event_type("create_refused", &json!({})), None);
/// ```
pub fn event_type(action: &str, details: &Value) -> Option<&'static str> {
    Some(match action {
        "create" => "api_key.created",
        "update" => match details["changes"]["disabled"]["to"].as_bool() {
            Some(true) => "api_key.disabled",
            Some(false) => "api_key.enabled",
            None => "api_key.updated",
        },
        "roll" => "api_key.rolled",
        "revoke" => "api_key.revoked",
        "leak" => "api_key.leaked",
        "delete" => "api_key.deleted",
        "expiry_warning" => "api_key.expiring",
        "stale_warning" => "api_key.stale",
        _ => return None,
    })
}

pub use crate::config::{Endpoint, WebhookConfig, WebhookSecret};

/// Counters and states of every endpoint, for `/healthz`, `/metrics` and the admin status.
#[derive(Debug, Default)]
pub struct WebhookStatus {
    endpoints: Vec<Arc<EndpointStatus>>,
}

#[derive(Debug)]
struct EndpointStatus {
    endpoint: Endpoint,
    /// Whether this process delivers (it holds the webhook lock).
    delivering: std::sync::atomic::AtomicBool,
    delivered: AtomicU64,
    failures: AtomicU64,
    failures_in_a_row: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// The most events a report counts per endpoint: the count is a scan of the backlog, and the
/// open routes must stay cheap however long an endpoint was down.
pub const PENDING_COUNT_MAX: u64 = 10_000;

/// What `/healthz` shows of the webhooks: counts and states, never an error's text.
#[derive(Debug, Serialize)]
pub struct WebhookReport {
    /// How many endpoints are configured (0: webhooks are off).
    pub endpoints: usize,
    /// Whether this process delivers (one origin does, the one holding the webhook lock).
    pub delivering: bool,
    /// `ok`, or `failing` while some endpoint's last delivery failed.
    pub state: &'static str,
    /// Events not yet delivered, summed over the endpoints (each counted up to
    /// [`PENDING_COUNT_MAX`]).
    pub pending: u64,
    /// Age of the oldest event some endpoint still waits for (0 if none).
    pub lag_ms: i64,
    /// Deliveries accepted since start.
    pub delivered: u64,
    /// Failed attempts since start (each retried).
    pub failures: u64,
    /// Per endpoint, for admins only: its label (`scheme://host #hash`), pending events and
    /// last error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Vec<Value>>,
}

impl WebhookStatus {
    /// The status of `endpoints`, none of them delivering yet.
    pub fn new(endpoints: &[Endpoint]) -> Self {
        Self {
            endpoints: endpoints
                .iter()
                .map(|endpoint| {
                    Arc::new(EndpointStatus {
                        endpoint: endpoint.clone(),
                        delivering: std::sync::atomic::AtomicBool::new(false),
                        delivered: AtomicU64::new(0),
                        failures: AtomicU64::new(0),
                        failures_in_a_row: AtomicU64::new(0),
                        last_error: Mutex::new(None),
                    })
                })
                .collect(),
        }
    }

    /// The report for `/healthz` and `/metrics`.
    pub async fn report(&self, store: &dyn KeyStore) -> Result<WebhookReport, StoreError> {
        self.build(store, false).await
    }

    /// [`Self::report`] with each endpoint's label, backlog and last error (for admins).
    pub async fn detailed_report(&self, store: &dyn KeyStore) -> Result<WebhookReport, StoreError> {
        self.build(store, true).await
    }

    async fn build(
        &self,
        store: &dyn KeyStore,
        detailed: bool,
    ) -> Result<WebhookReport, StoreError> {
        let now = system_now();
        let (mut pending, mut lag_ms, mut delivered, mut failures, mut failing) =
            (0, 0, 0, 0, false);
        let mut delivering = false;
        let mut detail = Vec::new();
        for status in &self.endpoints {
            let cursor = store
                .webhook_cursor(status.endpoint.key())
                .await?
                .unwrap_or(i64::MAX);
            let (waiting, oldest) = store
                .audit_count(cursor, EVENT_ACTIONS, PENDING_COUNT_MAX)
                .await?;
            pending += waiting;
            lag_ms = lag_ms.max(oldest.map_or(0, |at| (now.0 - at.0).max(0)));
            delivered += status.delivered.load(Ordering::Relaxed);
            failures += status.failures.load(Ordering::Relaxed);
            delivering |= status.delivering.load(Ordering::Relaxed);
            let in_a_row = status.failures_in_a_row.load(Ordering::Relaxed);
            failing |= in_a_row > 0;
            if detailed {
                let last_error = status
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                detail.push(json!({
                    "endpoint": status.endpoint.label(),
                    "pending": waiting,
                    "failures_in_a_row": in_a_row,
                    "last_error": last_error,
                }));
            }
        }
        Ok(WebhookReport {
            endpoints: self.endpoints.len(),
            delivering,
            state: if failing { "failing" } else { "ok" },
            pending,
            lag_ms,
            delivered,
            failures,
            detail: detailed.then_some(detail),
        })
    }
}

/// Gives every endpoint seen for the first time a cursor at the newest audit entry. Called
/// before origin takes requests, so the first change after a start is never taken for history.
pub async fn init_cursors(config: &WebhookConfig, store: &dyn KeyStore) -> Result<(), StoreError> {
    for endpoint in &config.endpoints {
        store
            .init_webhook_cursor(endpoint.key(), system_now())
            .await?;
    }
    Ok(())
}

/// Delivers events to every configured endpoint until `stop`, while this process holds the
/// webhooks lease.
pub async fn run(
    config: WebhookConfig,
    store: Arc<dyn KeyStore>,
    status: Arc<WebhookStatus>,
    commits: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let Ok(lease) = store
            .hold_lease(
                Role::Webhooks,
                &mut stop,
                "another origin holds the webhook lock; waiting",
            )
            .await
        else {
            return;
        };
        tokio::select! {
            () = deliver(&config, &store, &status, &commits, &stop) => return,
            () = lease.lost_wait() => lost_lease(Role::Webhooks),
        }
    }
}

/// Delivers to every endpoint until `stop` (see [`run`]).
async fn deliver(
    config: &WebhookConfig,
    store: &Arc<dyn KeyStore>,
    status: &WebhookStatus,
    commits: &watch::Receiver<u64>,
    stop: &watch::Receiver<bool>,
) {
    let http = match reqwest::Client::builder()
        .timeout(config.timeout)
        .user_agent("latchkey-origin")
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(http) => http,
        Err(error) => {
            tracing::error!(%error, "webhooks: cannot build the HTTP client; webhooks are OFF");
            return;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for me in &status.endpoints {
        let signers = signers_for(config, &me.endpoint);
        if signers.is_empty() {
            // The configuration requires a secret; never send an unsigned event.
            tracing::error!("webhooks: no signing secret; webhooks are OFF");
            return;
        }
        let deliverer = Deliverer {
            endpoint: me.endpoint.clone(),
            store: store.clone(),
            http: http.clone(),
            signers,
            first_retry: FIRST_RETRY.min(config.retry_max),
            retry_max: config.retry_max,
        };
        tasks.spawn(deliverer.run(me.clone(), commits.clone(), stop.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

/// The signers of `endpoint`'s deliveries: its own secret under each `WEBHOOK_SECRET` (in
/// order, for rotation), and the shared secrets themselves while `sign_with_shared` is on.
fn signers_for(config: &WebhookConfig, endpoint: &Endpoint) -> Arc<[standardwebhooks::Webhook]> {
    let own = config
        .secrets
        .iter()
        .filter_map(|s| s.for_endpoint(endpoint));
    let shared = config
        .secrets
        .iter()
        .filter(|_| config.sign_with_shared)
        .cloned();
    own.chain(shared)
        .filter_map(|s| standardwebhooks::Webhook::from_bytes(s.as_bytes().to_vec()).ok())
        .collect()
}

/// One endpoint's deliveries.
struct Deliverer {
    endpoint: Endpoint,
    store: Arc<dyn KeyStore>,
    http: reqwest::Client,
    signers: Arc<[standardwebhooks::Webhook]>,
    first_retry: Duration,
    retry_max: Duration,
}

/// Why a delivery did not count.
enum Failed {
    /// The endpoint did not take it: retry the same event later.
    Endpoint(String),
    /// The database failed.
    Store(StoreError),
    /// Origin is stopping.
    Stopped,
}

impl Deliverer {
    async fn run(
        self,
        me: Arc<EndpointStatus>,
        mut commits: watch::Receiver<u64>,
        mut stop: watch::Receiver<bool>,
    ) {
        let label = self.endpoint.label().to_owned();
        let mut cursor = loop {
            match self.start_cursor().await {
                Ok(cursor) => break cursor,
                Err(error) => {
                    tracing::warn!(%error, endpoint = %label, "webhooks: cannot read or make the cursor; retrying");
                    if sleep_or_stop(Duration::from_secs(5), &mut stop).await {
                        return;
                    }
                }
            }
        };
        me.delivering.store(true, Ordering::Relaxed);
        // The cursor in the database; saved once a page (and before a wait), not per event:
        // a crash in between sends those events again, which receivers drop by `webhook-id`.
        let mut saved = cursor;
        let mut wait = self.first_retry;
        loop {
            if *stop.borrow() {
                self.save(cursor, &mut saved).await;
                return;
            }
            commits.borrow_and_update();
            let page = match self.store.audit_log(None, cursor, PAGE).await {
                Ok(page) => page,
                Err(error) => {
                    tracing::error!(%error, "webhooks: cannot read the audit log");
                    if sleep_or_stop(wait, &mut stop).await {
                        return;
                    }
                    continue;
                }
            };
            let full = page.len() == PAGE as usize;
            for entry in &page {
                let Some(kind) = event_type(&entry.action, &entry.details) else {
                    cursor = entry.seq;
                    continue;
                };
                // Deliver this event until it is taken: later ones wait, so order holds.
                loop {
                    let outcome = tokio::select! {
                        outcome = self.deliver(kind, entry) => outcome,
                        _ = stop.changed() => Err(Failed::Stopped),
                    };
                    let detail = match outcome {
                        Ok(()) => break,
                        Err(Failed::Stopped) => {
                            self.save(cursor, &mut saved).await;
                            return;
                        }
                        Err(Failed::Endpoint(e)) => e,
                        Err(Failed::Store(e)) => format!("database: {e}"),
                    };
                    me.failures.fetch_add(1, Ordering::Relaxed);
                    me.failures_in_a_row.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(endpoint = %label, event = kind, seq = entry.seq, error = %detail, retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), "webhook delivery failed; retrying");
                    *me.last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(detail);
                    self.save(cursor, &mut saved).await;
                    if sleep_or_stop(wait, &mut stop).await {
                        return;
                    }
                    wait = (wait * 2).min(self.retry_max);
                }
                wait = self.first_retry;
                me.failures_in_a_row.store(0, Ordering::Relaxed);
                me.delivered.fetch_add(1, Ordering::Relaxed);
                cursor = entry.seq;
            }
            self.save(cursor, &mut saved).await;
            if full {
                continue;
            }
            tokio::select! {
                _ = commits.changed() => {}
                () = tokio::time::sleep(POLL) => {}
                changed = stop.changed() => {
                    if changed.is_err() {
                        // Nobody can stop us any more: origin is going away.
                        self.save(cursor, &mut saved).await;
                        return;
                    }
                }
            }
        }
    }

    /// Saves `cursor` if it moved since `saved`.
    async fn save(&self, cursor: i64, saved: &mut i64) {
        if cursor == *saved {
            return;
        }
        match self
            .store
            .set_webhook_cursor(self.endpoint.key(), cursor, system_now())
            .await
        {
            Ok(()) => *saved = cursor,
            // Delivered, but the cursor did not move: sent again after a restart.
            Err(error) => tracing::error!(%error, "webhooks: cannot save the cursor"),
        }
    }

    /// The saved cursor; made now if [`init_cursors`] could not (a read-only database then).
    async fn start_cursor(&self) -> Result<i64, StoreError> {
        if let Some(cursor) = self.store.webhook_cursor(self.endpoint.key()).await? {
            return Ok(cursor);
        }
        self.store
            .init_webhook_cursor(self.endpoint.key(), system_now())
            .await?;
        Ok(self
            .store
            .webhook_cursor(self.endpoint.key())
            .await?
            .unwrap_or(0))
    }

    /// The key's name and subject as they were just after the audit entry `seq`: for each, what
    /// the first later update of it changed it from, or else what it is now. Every attempt at an
    /// event thus sends the same body, whatever happened to the key in between (before, the key
    /// was read as it was at each attempt, so an event retried after a rename, or sent again
    /// after a crash, came with the same `webhook-id` and another body).
    async fn key_as_of(
        &self,
        id: &KeyId,
        seq: i64,
    ) -> Result<Option<(String, String)>, StoreError> {
        // The key first, then its later entries: an update committed in between is among those
        // entries, and what it changed from is what was read.
        let Some(key) = self.store.get(id).await? else {
            return Ok(None);
        };
        let (mut name, mut subject) = (None, None);
        let mut after = seq;
        while name.is_none() || subject.is_none() {
            let page = self.store.audit_log(Some(id), after, PAGE).await?;
            for later in page.iter().filter(|e| e.action == "update") {
                let changes = &later.details["changes"];
                let from = |field: &str| changes[field]["from"].as_str().map(str::to_owned);
                name = name.or_else(|| from("name"));
                subject = subject.or_else(|| from("subject"));
            }
            match page.last() {
                Some(last) if page.len() == PAGE as usize => after = last.seq,
                _ => break,
            }
        }
        Ok(Some((
            name.unwrap_or(key.name),
            subject.unwrap_or(key.subject),
        )))
    }

    async fn deliver(&self, kind: &'static str, entry: &AuditEntry) -> Result<(), Failed> {
        // The key's name and subject as of the event, so the receiver can tell whose it is.
        let key = match entry.key_id.as_deref().map(KeyId::parse) {
            Some(Ok(id)) => match self
                .key_as_of(&id, entry.seq)
                .await
                .map_err(Failed::Store)?
            {
                Some((name, subject)) => json!({ "id": id, "name": name, "subject": subject }),
                None => json!({ "id": id }),
            },
            _ => Value::Null,
        };
        let payload = json!({
            "type": kind,
            "timestamp": UnixMillis(entry.at).to_iso8601(),
            "data": {
                "key": key,
                "actor": entry.actor,
                "details": entry.details,
                "audit_seq": entry.seq,
            },
        });
        let body = serde_json::to_vec(&payload).map_err(|e| Failed::Endpoint(e.to_string()))?;
        // The same id on every attempt, and unique: the entry's place in the chain and its hash.
        let id = format!(
            "msg_{}_{}",
            entry.seq,
            entry.hash.get(..16).unwrap_or(&entry.hash)
        );
        let timestamp = system_now().0 / 1000;
        let signatures: Vec<String> = self
            .signers
            .iter()
            .map(|s| s.sign(&id, timestamp, &body))
            .collect::<Result<_, _>>()
            .map_err(|e| Failed::Endpoint(format!("cannot sign: {e}")))?;
        let response = self
            .http
            .post(self.endpoint.url())
            .header("content-type", "application/json")
            .header(standardwebhooks::HEADER_WEBHOOK_ID, &id)
            .header(
                standardwebhooks::HEADER_WEBHOOK_TIMESTAMP,
                timestamp.to_string(),
            )
            .header(
                standardwebhooks::HEADER_WEBHOOK_SIGNATURE,
                signatures.join(" "),
            )
            .body(body)
            .send()
            .await
            .map_err(|e| Failed::Endpoint(e.without_url().to_string()))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(Failed::Endpoint(format!("answered {}", response.status())))
        }
    }
}

/// Sleeps `wait`; `true` if `stop` turned meanwhile.
async fn sleep_or_stop(wait: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before, one `WEBHOOK_SECRET` signed every endpoint's events, so a receiver could sign
    /// events that another receiver accepts. Now each endpoint's secret is its own.
    #[test]
    fn each_endpoint_is_signed_with_a_secret_of_its_own() {
        let master =
            WebhookSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").expect("secret");
        let other = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        let (a, b) = (
            Endpoint::new("https://a.example/hooks"),
            Endpoint::new("https://b.example/hooks"),
        );
        let own = |secret: &WebhookSecret, endpoint: &Endpoint| {
            secret.for_endpoint(endpoint).expect("32 bytes")
        };
        let (sa, sb) = (own(&master, &a), own(&master, &b));
        assert_eq!(sa.as_bytes().len(), 32);
        assert_ne!(sa.as_bytes(), sb.as_bytes(), "endpoints differ");
        assert_ne!(sa.as_bytes(), master.as_bytes(), "not the shared secret");
        assert_ne!(sa.as_bytes(), own(&other, &a).as_bytes(), "masters differ");
        assert_eq!(sa.as_bytes(), own(&master, &a).as_bytes(), "stable");
        assert_eq!(
            WebhookSecret::parse(&sa.to_whsec())
                .expect("whsec")
                .as_bytes(),
            sa.as_bytes(),
            "printed as WEBHOOK_SECRET spells secrets"
        );

        // What B's receiver could sign, A's receiver refuses; A's own signature passes.
        let verifier_a = standardwebhooks::Webhook::from_bytes(sa.as_bytes().to_vec()).expect("a");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let payload = br#"{"type":"api_key.revoked"}"#;
        let headers = |signer: &WebhookSecret| {
            let signature = standardwebhooks::Webhook::from_bytes(signer.as_bytes().to_vec())
                .expect("signer")
                .sign("msg_1", now, payload)
                .expect("sign");
            let mut h = axum::http::HeaderMap::new();
            h.insert("webhook-id", "msg_1".parse().expect("id"));
            h.insert("webhook-timestamp", now.to_string().parse().expect("ts"));
            h.insert("webhook-signature", signature.parse().expect("sig"));
            h
        };
        assert!(
            verifier_a.verify(payload, &headers(&sb)).is_err(),
            "B forges for A"
        );
        assert!(
            verifier_a.verify(payload, &headers(&master)).is_err(),
            "the shared secret"
        );
        assert!(verifier_a.verify(payload, &headers(&sa)).is_ok());

        // The signers: own secrets in order, the shared ones only while asked for.
        let mut config = WebhookConfig {
            endpoints: vec![a.clone()],
            secrets: vec![other, master],
            sign_with_shared: false,
            timeout: Duration::from_secs(1),
            retry_max: Duration::from_secs(1),
        };
        assert_eq!(signers_for(&config, &a).len(), 2);
        config.sign_with_shared = true;
        assert_eq!(signers_for(&config, &a).len(), 4);
    }

    /// The actions the backlog counts are exactly those that are events.
    #[test]
    fn every_event_action_is_an_event_and_no_other_is() {
        let actions = [
            "create",
            "update",
            "roll",
            "revoke",
            "leak",
            "delete",
            "expiry_warning",
            "stale_warning",
            "create_refused",
            "update_refused",
            "anchor",
        ];
        for action in actions {
            assert_eq!(
                event_type(action, &json!({})).is_some(),
                EVENT_ACTIONS.contains(&action),
                "{action}"
            );
        }
        assert!(EVENT_ACTIONS.iter().all(|a| actions.contains(a)));
    }

    #[test]
    fn an_endpoint_is_named_without_its_path() {
        let e = Endpoint::new("https://hooks.example:8443/t/SECRET-TOKEN");
        assert!(
            e.label().starts_with("https://hooks.example:8443 #"),
            "{}",
            e.label()
        );
        assert!(!e.label().contains("SECRET"));
        assert_eq!(e.key().len(), 64);
    }
}

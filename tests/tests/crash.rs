//! Crashes: under concurrent create/update/revoke/roll load, origin is killed with SIGKILL at random
//! moments and restarted over the same database, with the real Worker reading the real local
//! KV. Afterwards every mutation that was answered 2xx is present (scopes too, including those
//! of an update acknowledged after an earlier one went unanswered), every acknowledged change
//! has its audit row, every acknowledged revocation fails verification at origin and, once the
//! outbox drained, every key's answer at the edge is origin's final state. Every roll is
//! linked both ways (never a successor without its link), and every acknowledged one is there. A 5xx answer is a
//! failure (reported apart from requests that got no answer because origin died).
//!
//! Event webhooks are on, to a receiver that stays up throughout (and fails the first delivery of
//! one event in 100): every event of the audit log, so every acknowledged change's, arrives at
//! least once, in audit order (a repeat only of an event already delivered, with the same
//! `webhook-id` and body; never a gap).
//!
//! `LATCHKEY_CRASH_ROUNDS` sets the number of kills (default 20; `./dev soak` runs more).

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failure is a failed test"
)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use common::edge::{Stack, free_port, report_measurement};
use common::{ADMIN_TOKEN, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The `WEBHOOK_SECRET` origin derives the receiver's own secret from.
const WEBHOOK_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

/// An acknowledged change, as its audit row must show it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Create(Vec<String>),
    Update(Vec<String>),
    Revoke,
    /// Rolled to the key named.
    Roll(String),
}

/// What a client was told about one key.
#[derive(Debug, Default, Clone)]
struct Acknowledged {
    secret: String,
    /// Scopes of the last acknowledged change, unless a later change is in doubt.
    scopes: Option<Vec<String>>,
    /// An update timed out while origin was up: it may still commit after a later one, so
    /// the scopes stay unknown for good. (An update that got no answer because origin died
    /// died with it: a later acknowledged update makes the scopes known again.)
    update_may_land_late: bool,
    revoked: bool,
    revoke_in_doubt: bool,
    /// Every acknowledged change, in order: each must have its audit row.
    changes: Vec<Change>,
    /// An update went unanswered (origin died) and a later one was acknowledged: the scopes
    /// are known, and checked, again.
    rechecked: bool,
}

#[derive(Debug, Default)]
struct Ledger {
    keys: HashMap<String, Acknowledged>,
    acknowledged: usize,
    /// Requests sent that got no answer (origin died, or the client timed out).
    unanswered: usize,
    /// Of those, timeouts.
    timeouts: usize,
    /// 5xx answers: origin answered that it failed. Never expected.
    server_errors: Vec<String>,
}

/// A small deterministic generator (xorshift), seeded per client.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What came of one request.
enum Outcome {
    Answered(StatusCode, Value),
    /// The connection was refused: the request never reached origin, nothing is in doubt.
    NotSent,
    /// Sent, but no answer (origin died meanwhile): it may or may not have committed.
    NoAnswer,
    /// Sent, and no answer within the client's timeout: it may still commit later.
    TimedOut,
}

async fn send(req: reqwest::RequestBuilder) -> Outcome {
    match req.send().await {
        Ok(response) => {
            let status = response.status();
            match response.json::<Value>().await {
                Ok(body) => Outcome::Answered(status, body),
                Err(_) => Outcome::NoAnswer,
            }
        }
        Err(e) if e.is_connect() => Outcome::NotSent,
        Err(e) if e.is_timeout() => Outcome::TimedOut,
        Err(_) => Outcome::NoAnswer,
    }
}

/// One client: creates keys, changes their scopes, revokes some, recording what was answered.
async fn client_loop(
    base: String,
    ledger: Arc<Mutex<Ledger>>,
    seed: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("client");
    let mut rng = Rng(seed | 1);
    let mut mine: Vec<String> = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let choice = if mine.is_empty() { 0 } else { rng.below(10) };
        let auth = |r: reqwest::RequestBuilder| r.bearer_auth(ADMIN_TOKEN);
        if choice < 5 {
            let scopes = vec![format!("read:s{}", rng.below(5))];
            let req = auth(client.post(format!("{base}/v1/api_keys")))
                .json(&json!({"name": "crash", "subject": "acme", "scopes": scopes}));
            let answer = send(req).await;
            if matches!(answer, Outcome::NotSent) {
                // Origin is down: nothing happened; wait for it like a real client would.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let mut ledger = ledger.lock().expect("ledger");
            match answer {
                Outcome::Answered(status, body) if status.is_success() => {
                    let id = body["id"].as_str().expect("id").to_owned();
                    ledger.keys.insert(
                        id.clone(),
                        Acknowledged {
                            secret: body["secret"].as_str().expect("secret").to_owned(),
                            scopes: Some(scopes.clone()),
                            changes: vec![Change::Create(scopes)],
                            ..Acknowledged::default()
                        },
                    );
                    ledger.acknowledged += 1;
                    mine.push(id);
                }
                Outcome::Answered(status, body) if status.is_client_error() => {
                    panic!("create refused: {status} {body}")
                }
                Outcome::Answered(status, body) => {
                    ledger
                        .server_errors
                        .push(format!("create: {status} {body}"));
                }
                Outcome::TimedOut => {
                    ledger.unanswered += 1;
                    ledger.timeouts += 1;
                }
                Outcome::NoAnswer | Outcome::NotSent => ledger.unanswered += 1,
            }
        } else if choice == 7 {
            let id = mine[usize::try_from(rng.below(mine.len() as u64)).expect("index")].clone();
            roll(&client, &base, &ledger, &mut mine, &id, rng.below(2) * 3600).await;
        } else {
            let id = mine[usize::try_from(rng.below(mine.len() as u64)).expect("index")].clone();
            let revoke = choice >= 8;
            let scopes = vec![format!("write:s{}", rng.below(5))];
            let req = if revoke {
                auth(client.post(format!("{base}/v1/api_keys/{id}/revoke"))).json(&json!({}))
            } else {
                auth(client.patch(format!("{base}/v1/api_keys/{id}")))
                    .json(&json!({"scopes": scopes}))
            };
            let answer = send(req).await;
            if matches!(answer, Outcome::NotSent) {
                // Origin is down: nothing happened; wait for it like a real client would.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let mut ledger = ledger.lock().expect("ledger");
            let (mut server_error, mut timed_out, mut unanswered) = (None, false, false);
            let mut acked = false;
            let entry = ledger.keys.get_mut(&id).expect("own key");
            let already_revoked = entry.revoked || entry.revoke_in_doubt;
            match answer {
                Outcome::Answered(status, _) if status.is_success() => {
                    acked = true;
                    if revoke {
                        entry.revoked = true;
                        entry.changes.push(Change::Revoke);
                    } else {
                        entry.changes.push(Change::Update(scopes.clone()));
                        if !entry.update_may_land_late {
                            entry.rechecked |= entry.scopes.is_none();
                            entry.scopes = Some(scopes);
                        }
                    }
                }
                // Changing a revoked key is refused (409): expected once a revoke may have landed.
                Outcome::Answered(StatusCode::CONFLICT, _) if already_revoked => {}
                Outcome::Answered(status, body) if status.is_client_error() => {
                    panic!("change of {id} refused: {status} {body}")
                }
                other => {
                    match other {
                        Outcome::Answered(status, body) => {
                            server_error = Some(format!(
                                "{} {id}: {status} {body}",
                                if revoke { "revoke" } else { "update" }
                            ));
                        }
                        Outcome::TimedOut => timed_out = true,
                        _ => unanswered = true,
                    }
                    if revoke {
                        entry.revoke_in_doubt = true;
                    } else {
                        entry.scopes = None;
                        entry.update_may_land_late |= timed_out;
                    }
                }
            }
            match (server_error, timed_out, unanswered) {
                (Some(error), _, _) => ledger.server_errors.push(error),
                (None, true, _) => {
                    ledger.unanswered += 1;
                    ledger.timeouts += 1;
                }
                (None, false, true) => ledger.unanswered += 1,
                (None, false, false) => ledger.acknowledged += usize::from(acked),
            }
            if revoke {
                mine.retain(|k| *k != id);
            }
        }
    }
}

/// Rolls `id` with `grace` seconds and records what was answered: an acknowledged roll's new
/// key joins the ledger with the old key's scopes, if they are known, and takes the old key's
/// place in `mine` (a rolled key rolls no more, nor does one whose roll is in doubt).
async fn roll(
    client: &reqwest::Client,
    base: &str,
    ledger: &Mutex<Ledger>,
    mine: &mut Vec<String>,
    id: &str,
    grace: u64,
) {
    let req = client
        .post(format!("{base}/v1/api_keys/{id}/roll"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "grace_period_seconds": grace }));
    let answer = send(req).await;
    if matches!(answer, Outcome::NotSent) {
        // Origin is down: nothing happened; wait for it like a real client would.
        tokio::time::sleep(Duration::from_millis(20)).await;
        return;
    }
    mine.retain(|k| k != id);
    let mut ledger = ledger.lock().expect("ledger");
    let entry = ledger.keys.get_mut(id).expect("own key");
    let already_revoked = entry.revoked || entry.revoke_in_doubt;
    match answer {
        Outcome::Answered(status, body) if status.is_success() => {
            let new_id = body["id"].as_str().expect("id").to_owned();
            entry.changes.push(Change::Roll(new_id.clone()));
            entry.revoked |= grace == 0;
            let scopes = entry.scopes.clone();
            let successor = Acknowledged {
                secret: body["secret"].as_str().expect("secret").to_owned(),
                changes: scopes.iter().cloned().map(Change::Create).collect(),
                scopes,
                ..Acknowledged::default()
            };
            ledger.keys.insert(new_id.clone(), successor);
            ledger.acknowledged += 1;
            mine.push(new_id);
        }
        // Refused (409) once a revoke may have landed.
        Outcome::Answered(StatusCode::CONFLICT, _) if already_revoked => {}
        Outcome::Answered(status, body) if status.is_client_error() => {
            panic!("roll of {id} refused: {status} {body}")
        }
        Outcome::Answered(status, body) => {
            ledger
                .server_errors
                .push(format!("roll {id}: {status} {body}"));
        }
        other => {
            entry.revoke_in_doubt |= grace == 0;
            ledger.unanswered += 1;
            ledger.timeouts += usize::from(matches!(other, Outcome::TimedOut));
        }
    }
}

/// One delivery the webhook receiver accepted.
#[derive(Debug, Clone)]
struct Delivery {
    /// Its `webhook-id`.
    id: String,
    /// The event's place in the audit log (`data.audit_seq`).
    seq: i64,
    body: Bytes,
    /// When it arrived.
    at: Instant,
}

/// What the webhook receiver saw.
#[derive(Debug, Default)]
struct Deliveries {
    /// Every delivery it accepted, in arrival order (repeats too).
    accepted: Vec<Delivery>,
    /// Deliveries whose signature or timestamp did not verify.
    refused: usize,
    /// The events whose first delivery it answered 503 on purpose: one in [`FAIL_EVERY`].
    failed_once: HashSet<i64>,
}

/// The receiver fails the first delivery of every event whose audit seq is a multiple of this,
/// as receivers sometimes do: origin retries it (after `WEBHOOK_RETRY_MAX_MS`) before any later
/// event, and a SIGKILL meanwhile must not lose it.
const FAIL_EVERY: i64 = 100;

/// Starts a webhook receiver on a port of its own, up for the whole test: it checks each
/// delivery with the Standard Webhooks reference library under its endpoint's own secret (as
/// `origin webhook-secrets` prints it), records it and answers 204 (or fails it on purpose, see
/// [`FAIL_EVERY`]). Returns its URL.
async fn webhook_receiver(deliveries: Arc<Mutex<Deliveries>>) -> String {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind the webhook receiver");
    let url = format!("http://{}/hooks", listener.local_addr().expect("address"));
    let out = std::process::Command::new(common::origin_binary())
        .arg("webhook-secrets")
        .env("WEBHOOK_URLS", &url)
        .env("WEBHOOK_SECRET", WEBHOOK_SECRET)
        .output()
        .expect("run origin webhook-secrets");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let (_, secret) = text.trim().split_once(' ').expect("`<url> <secret>`");
    let verifier = Arc::new(standardwebhooks::Webhook::new(secret).expect("secret"));
    let app = axum::Router::new().route(
        "/hooks",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let (deliveries, verifier) = (deliveries.clone(), verifier.clone());
            async move {
                let mut deliveries = deliveries.lock().expect("deliveries");
                if verifier.verify(&body, &headers).is_err() {
                    deliveries.refused += 1;
                    return AxumStatus::UNAUTHORIZED;
                }
                let payload: Value = serde_json::from_slice(&body).expect("JSON payload");
                let seq = payload["data"]["audit_seq"].as_i64().expect("audit_seq");
                if seq % FAIL_EVERY == 0 && deliveries.failed_once.insert(seq) {
                    return AxumStatus::SERVICE_UNAVAILABLE;
                }
                deliveries.accepted.push(Delivery {
                    id: headers["webhook-id"].to_str().expect("id").to_owned(),
                    seq,
                    body,
                    at: Instant::now(),
                });
                AxumStatus::NO_CONTENT
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// Every key at origin, as `id → (rolled_from, rolled_to)`.
async fn roll_links(origin: &common::TestApp) -> HashMap<String, (Value, Value)> {
    let mut links = HashMap::new();
    let mut offset = 0;
    loop {
        let page = origin
            .get(&format!(
                "/v1/api_keys?include_invalid=true&limit=500&offset={offset}"
            ))
            .await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        let keys = page.body["data"].as_array().expect("data");
        for key in keys {
            links.insert(
                key["id"].as_str().expect("id").to_owned(),
                (key["rolled_from"].clone(), key["rolled_to"].clone()),
            );
        }
        offset += keys.len();
        if keys.is_empty() || offset as u64 >= page.body["total_count"].as_u64().expect("count") {
            return links;
        }
    }
}

#[tokio::test]
async fn sigkill_under_load_loses_no_acknowledged_change() {
    let rounds: u32 = std::env::var("LATCHKEY_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let deliveries = Arc::new(Mutex::new(Deliveries::default()));
    let webhook_url = webhook_receiver(deliveries.clone()).await;
    // Reconciliation off: it would repair a change the outbox lost, and hide that loss from the
    // edge check below.
    let mut stack = Stack::start(&[
        ("ORIGIN_LISTEN", &listen),
        ("KV_RETRY_MAX_MS", "200"),
        ("KV_RECONCILE_INTERVAL_S", "0"),
        ("WEBHOOK_URLS", &webhook_url),
        ("WEBHOOK_SECRET", WEBHOOK_SECRET),
        ("WEBHOOK_RETRY_MAX_MS", "200"),
    ])
    .await;
    let base = stack.origin.base.clone();

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seed = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
            % u128::from(u64::MAX),
    )
    .expect("fits");
    eprintln!("crash test seed {seed}");
    let clients: Vec<_> = (0..6)
        .map(|i| {
            tokio::spawn(client_loop(
                base.clone(),
                ledger.clone(),
                seed.wrapping_add(i * 7919),
                stop.clone(),
            ))
        })
        .collect();

    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(150 + rng.below(350))).await;
        stack.origin.kill();
        tokio::time::sleep(Duration::from_millis(rng.below(100))).await;
        stack.origin.start_again().await;
        assert_eq!(
            stack.origin.base, base,
            "round {round}: origin came back on its port"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await.expect("client task");
    }
    let load_ended = Instant::now();
    let ledger = Arc::try_unwrap(ledger)
        .expect("clients done")
        .into_inner()
        .expect("ledger");

    // At origin: every acknowledged create, update and revoke is there.
    let mut checked_revocations = 0;
    for (id, ack) in &ledger.keys {
        let r = stack.origin.get(&format!("/v1/api_keys/{id}")).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "acknowledged key {id} lost: {}",
            r.body
        );
        if ack.revoked {
            assert_eq!(
                r.body["revoked"], true,
                "acknowledged revocation of {id} lost"
            );
            let v = stack.origin.verify(&ack.secret, &[]).await;
            assert_eq!(v.body["errors"][0]["code"], "api_key_revoked", "{id}");
            checked_revocations += 1;
        } else if !ack.revoke_in_doubt {
            assert_eq!(r.body["revoked"], false, "{id} revoked without a request");
            if let Some(scopes) = &ack.scopes {
                assert_eq!(
                    r.body["scopes"],
                    json!(scopes),
                    "acknowledged scopes of {id} lost"
                );
            }
        }
    }
    // Rolls: never a successor without its link, never a link without its successor, and
    // every acknowledged roll is there.
    let links = roll_links(&stack.origin).await;
    let mut rolls = 0;
    for (id, (from, to)) in &links {
        if let Some(to) = to.as_str() {
            assert_eq!(
                links.get(to).map(|l| &l.0),
                Some(&json!(id)),
                "{id} was rolled to {to}, which does not name it"
            );
            rolls += 1;
        }
        if let Some(from) = from.as_str() {
            assert_eq!(
                links.get(from).map(|l| &l.1),
                Some(&json!(id)),
                "{id} replaced {from}, which does not name it"
            );
        }
    }
    for (id, ack) in &ledger.keys {
        for change in &ack.changes {
            if let Change::Roll(to) = change {
                assert_eq!(links[id].1, json!(to), "acknowledged roll of {id} lost");
            }
        }
    }
    let out = stack.origin.run_command(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "audit chain after crashes: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // At the edge, once the outbox has drained: every key answers with origin's final state
    // (revoked or not, and the same scopes), whatever was in doubt.
    let drained = Instant::now();
    stack.wait_published(Duration::from_secs(60)).await;
    let drain = drained.elapsed();
    let mut edge_checked = 0;
    let mut edge_revoked = 0;
    for (id, ack) in &ledger.keys {
        let at_origin = stack.origin.get(&format!("/v1/api_keys/{id}")).await.body;
        let revoked = at_origin["revoked"].as_bool().expect("revoked");
        let mut scopes: Vec<String> =
            serde_json::from_value(at_origin["scopes"].clone()).expect("scopes");
        scopes.sort();
        let expected = if revoked { "REVOKED" } else { "VALID" };
        eventually(Duration::from_secs(10), || async {
            let r = stack.edge.verify(&ack.secret, &[]).await;
            let mut edge_scopes: Vec<String> =
                serde_json::from_value(r.body["scopes"].clone()).unwrap_or_default();
            edge_scopes.sort();
            if r.body["code"] == expected && r.body["revoked"] == revoked && edge_scopes == scopes
            {
                Ok(())
            } else {
                Err(format!(
                    "edge says {} for {id}, which origin has as revoked={revoked} scopes={scopes:?}",
                    r.body
                ))
            }
        })
        .await;
        edge_checked += 1;
        edge_revoked += usize::from(revoked);
    }
    // The audit log: every acknowledged change has its row, in order.
    let audit = audit_rows(&stack.origin).await;
    let audit_checked = each_change_found(&ledger, &changes_by_key(&audit), "audit row");

    // Webhooks: every event of the audit log reaches the receiver, in audit order, with repeats
    // only of events already delivered; so every acknowledged change's event does.
    let events: Vec<&Value> = audit
        .iter()
        .filter(|row| event_action(&row["action"]))
        .collect();
    // Once origin has nothing left to deliver, the receiver has it all.
    eventually(Duration::from_secs(60), || async {
        let health = stack.origin.get("/healthz").await.body;
        (health["webhooks"]["pending"] == 0)
            .then_some(())
            .ok_or_else(|| format!("webhooks not delivered: {health}"))
    })
    .await;
    let deliveries = std::mem::take(&mut *deliveries.lock().expect("deliveries"));
    let delivered = delivered_in_order(&events, &deliveries.accepted);
    assert_eq!(
        delivered.len(),
        events.len(),
        "events never delivered, from audit seq {}",
        events
            .get(delivered.len())
            .map_or(&Value::Null, |e| &e["seq"])
    );
    let webhook_checked =
        each_change_found(&ledger, &changes_by_key(&delivered), "delivered event");
    assert_eq!(deliveries.refused, 0, "every delivery's signature verified");
    let repeats = deliveries.accepted.len() - delivered.len();
    // When the last event first arrived, after the load ended (0 if before).
    let webhooks_drained = deliveries
        .accepted
        .iter()
        .filter(|d| d.seq == events.last().map_or(0, |e| e["seq"].as_i64().expect("seq")))
        .map(|d| d.at.saturating_duration_since(load_ended))
        .min()
        .unwrap_or_default();

    let scopes_known = ledger
        .keys
        .values()
        .filter(|a| a.scopes.is_some() && !a.revoke_in_doubt && !a.revoked)
        .count();
    let rechecked = ledger
        .keys
        .values()
        .filter(|a| a.rechecked && a.scopes.is_some() && !a.revoke_in_doubt && !a.revoked)
        .count();
    report_measurement(&format!(
        "crash: {rounds} SIGKILLs in {:.1} s under 6 concurrent clients; {} changes acknowledged, {} unanswered \
         ({} timeouts), {} 5xx answers; {} keys checked at origin ({checked_revocations} acknowledged revocations, \
         {scopes_known} with known scopes, {rechecked} of them after an unanswered update); {rolls} rolls, each linked both ways; \
         {audit_checked} acknowledged changes matched to audit rows; \
         all {edge_checked} keys compared at the edge with origin's final state ({edge_revoked} revoked); \
         outbox drained {:.1} s after the last restart; 0 lost",
        started.elapsed().as_secs_f64(),
        ledger.acknowledged,
        ledger.unanswered,
        ledger.timeouts,
        ledger.server_errors.len(),
        ledger.keys.len(),
        drain.as_secs_f64(),
    ));
    report_measurement(&format!(
        "crash webhooks: {} events delivered for {} acknowledged changes ({} deliveries, {repeats} duplicates, \
         each with its first delivery's webhook-id and body), in audit order with no gap, across {rounds} SIGKILLs \
         and {} deliveries failed on purpose; \
         {webhook_checked} acknowledged changes matched to their delivered events; every signature verified; \
         the last event first delivered {:.1} s after the load ended; 0 lost",
        delivered.len(),
        ledger.acknowledged,
        deliveries.accepted.len(),
        deliveries.failed_once.len(),
        webhooks_drained.as_secs_f64(),
    ));
    assert!(
        ledger.server_errors.is_empty(),
        "origin answered 5xx {} times: {:?}",
        ledger.server_errors.len(),
        ledger.server_errors.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        ledger.acknowledged > usize::try_from(rounds).expect("u32") * 2,
        "the load was real: {} acknowledged",
        ledger.acknowledged
    );
    assert!(
        checked_revocations > 0,
        "some revocations were acknowledged"
    );
    assert!(scopes_known > 0, "some live keys had known scopes to check");
}

/// Whether an audit action is an event webhooks deliver (origin's `delivery::webhooks::EVENT_ACTIONS`).
fn event_action(action: &Value) -> bool {
    [
        "create",
        "update",
        "roll",
        "revoke",
        "leak",
        "expiry_warning",
        "stale_warning",
    ]
    .iter()
    .any(|a| action == a)
}

/// The audit action an event type comes from.
fn action_of(event_type: &str) -> &'static str {
    match event_type {
        "api_key.created" => "create",
        "api_key.updated" | "api_key.disabled" | "api_key.enabled" => "update",
        "api_key.rolled" => "roll",
        "api_key.revoked" => "revoke",
        "api_key.leaked" => "leak",
        "api_key.expiring" => "expiry_warning",
        "api_key.stale" => "stale_warning",
        other => panic!("unknown event type {other}"),
    }
}

/// Checks the deliveries, in arrival order, against `events` (the audit log's events, oldest
/// first): each is the next event not yet delivered, or a repeat of one already delivered with
/// the same `webhook-id` and body; an event is never skipped, never passed by a later one. Each
/// event's first delivery carries its audit row (type, key, details). Returns the events as
/// delivered, once each, as audit rows (`seq`, `key_id`, `action`, `details`).
fn delivered_in_order(events: &[&Value], deliveries: &[Delivery]) -> Vec<Value> {
    let place: HashMap<i64, usize> = events
        .iter()
        .enumerate()
        .map(|(i, e)| (e["seq"].as_i64().expect("seq"), i))
        .collect();
    let newest = events.last().map_or(0, |e| e["seq"].as_i64().expect("seq"));
    let mut first: Vec<&Delivery> = Vec::new();
    let mut delivered = Vec::new();
    for (n, d) in deliveries.iter().enumerate() {
        if d.seq > newest {
            // Committed after the audit log was read (a request that had timed out).
            continue;
        }
        let Some(&i) = place.get(&d.seq) else {
            panic!("delivery {n} ({}) is no event of the audit log", d.id)
        };
        assert!(
            i <= first.len(),
            "delivery {n} is audit seq {}, while seq {} was not delivered yet: a gap",
            d.seq,
            events[first.len()]["seq"]
        );
        if let Some(earlier) = first.get(i) {
            assert!(
                earlier.id == d.id && earlier.body == d.body,
                "delivery {n} repeats audit seq {} with another id or body: {} {:?} then {} {:?}",
                d.seq,
                earlier.id,
                earlier.body,
                d.id,
                d.body
            );
            continue;
        }
        assert!(
            first.iter().all(|f| f.id != d.id),
            "webhook-id {} names two events",
            d.id
        );
        let payload: Value = serde_json::from_slice(&d.body).expect("JSON payload");
        let row = events[i];
        let as_row = json!({
            "seq": payload["data"]["audit_seq"],
            "key_id": payload["data"]["key"]["id"],
            "action": action_of(payload["type"].as_str().expect("type")),
            "details": payload["data"]["details"],
        });
        for field in ["seq", "key_id", "action", "details"] {
            assert_eq!(
                as_row[field], row[field],
                "delivery {n}'s {field}: {payload} for {row}"
            );
        }
        first.push(d);
        delivered.push(as_row);
    }
    delivered
}

/// Checks that every acknowledged change of every key is among `found` (each key's changes, in
/// order), in order; `what` names them in a failure. Returns how many were checked.
fn each_change_found(ledger: &Ledger, found: &HashMap<String, Vec<Change>>, what: &str) -> usize {
    let mut checked = 0;
    for (id, ack) in &ledger.keys {
        let rows = found.get(id).map_or(&[][..], Vec::as_slice);
        let mut rest = rows.iter();
        for change in &ack.changes {
            assert!(
                rest.any(|row| row == change),
                "acknowledged {change:?} of {id} has no {what}: acknowledged {:?}, found {rows:?}",
                ack.changes
            );
            checked += 1;
        }
    }
    checked
}

/// The whole audit log, oldest first.
async fn audit_rows(origin: &common::TestApp) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0u64;
    loop {
        let page = origin
            .get(&format!("/v1/audit_log?after={after}&limit=500"))
            .await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        all.extend(page.body["data"].as_array().expect("data").iter().cloned());
        match page.body["next_after"].as_u64() {
            Some(next) => after = next,
            None => return all,
        }
    }
}

/// Audit rows (or events as rows) as each key's changes in order (an update as the scopes it
/// left).
fn changes_by_key(rows: &[Value]) -> HashMap<String, Vec<Change>> {
    let mut by_key: HashMap<String, Vec<Change>> = HashMap::new();
    let mut scopes_now: HashMap<String, Vec<String>> = HashMap::new();
    for row in rows {
        let Some(id) = row["key_id"].as_str() else {
            continue;
        };
        let details = &row["details"];
        let change = match row["action"].as_str().expect("action") {
            "create" => {
                let scopes: Vec<String> =
                    serde_json::from_value(details["scopes"].clone()).expect("scopes");
                scopes_now.insert(id.to_owned(), scopes.clone());
                Change::Create(scopes)
            }
            "update" => {
                let scopes = match details["changes"]["scopes"]["to"].as_array() {
                    Some(_) => serde_json::from_value(details["changes"]["scopes"]["to"].clone())
                        .expect("scopes"),
                    None => scopes_now.get(id).cloned().unwrap_or_default(),
                };
                scopes_now.insert(id.to_owned(), scopes.clone());
                Change::Update(scopes)
            }
            "revoke" => Change::Revoke,
            "roll" => Change::Roll(details["rolled_to"].as_str().expect("rolled_to").to_owned()),
            _ => continue,
        };
        by_key.entry(id.to_owned()).or_default().push(change);
    }
    by_key
}

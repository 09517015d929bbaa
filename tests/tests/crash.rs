//! Crashes: under concurrent create/update/revoke/roll load, origin is killed with SIGKILL at random
//! moments and restarted over the same database, with the real Worker reading the real local
//! KV. Afterwards every mutation that was answered 2xx is present (scopes too, including those
//! of an update acknowledged after an earlier one went unanswered), every acknowledged change
//! has its audit row, every acknowledged revocation fails verification at origin and, once the
//! outbox drained, every key's answer at the edge is origin's final state. Every roll is
//! linked both ways (never a successor without its link), and every acknowledged one is there. A 5xx answer is a
//! failure (reported apart from requests that got no answer because origin died).
//!
//! `LATCHKEY_CRASH_ROUNDS` sets the number of kills (default 20; `./dev soak` runs more).

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failure is a failed test"
)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::edge::{Stack, free_port, report_measurement};
use common::{ADMIN_TOKEN, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};

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
    // Reconciliation off: it would repair a change the outbox lost, and hide that loss from the
    // edge check below.
    let mut stack = Stack::start(&[
        ("ORIGIN_LISTEN", &listen),
        ("KV_RETRY_MAX_MS", "200"),
        ("KV_RECONCILE_INTERVAL_S", "0"),
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
    let audited = audit_by_key(&stack.origin).await;
    let mut audit_checked = 0;
    for (id, ack) in &ledger.keys {
        let rows = audited.get(id).map_or(&[][..], Vec::as_slice);
        let mut rest = rows.iter();
        for change in &ack.changes {
            assert!(
                rest.any(|row| row == change),
                "acknowledged {change:?} of {id} has no audit row: acknowledged {:?}, audited {rows:?}",
                ack.changes
            );
            audit_checked += 1;
        }
    }

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

/// The whole audit log, as each key's changes in order (an update as the scopes it left).
async fn audit_by_key(origin: &common::TestApp) -> HashMap<String, Vec<Change>> {
    let mut by_key: HashMap<String, Vec<Change>> = HashMap::new();
    let mut scopes_now: HashMap<String, Vec<String>> = HashMap::new();
    let mut after = 0u64;
    loop {
        let page = origin
            .get(&format!("/v1/audit_log?after={after}&limit=500"))
            .await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        let rows = page.body["data"].as_array().expect("data").clone();
        for row in &rows {
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
                        Some(_) => {
                            serde_json::from_value(details["changes"]["scopes"]["to"].clone())
                                .expect("scopes")
                        }
                        None => scopes_now.get(id).cloned().unwrap_or_default(),
                    };
                    scopes_now.insert(id.to_owned(), scopes.clone());
                    Change::Update(scopes)
                }
                "revoke" => Change::Revoke,
                "roll" => {
                    Change::Roll(details["rolled_to"].as_str().expect("rolled_to").to_owned())
                }
                _ => continue,
            };
            by_key.entry(id.to_owned()).or_default().push(change);
        }
        match page.body["next_after"].as_u64() {
            Some(next) => after = next,
            None => return by_key,
        }
    }
}

//! Crashes: under concurrent create/update/revoke load, origin is killed with SIGKILL at random
//! moments and restarted over the same database, with the real Worker reading the real local
//! KV. Afterwards every mutation that was answered 2xx is present, every acknowledged
//! revocation fails verification at origin and, once the outbox drained, at the edge.
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

/// What a client was told about one key.
#[derive(Debug, Default, Clone)]
struct Acknowledged {
    secret: String,
    /// Scopes of the last acknowledged update, if no later change is in doubt.
    scopes: Option<Vec<String>>,
    /// A change to this key got no answer: its scopes are unknown (it may have committed).
    in_doubt: bool,
    revoked: bool,
    revoke_in_doubt: bool,
}

#[derive(Debug, Default)]
struct Ledger {
    keys: HashMap<String, Acknowledged>,
    acknowledged: usize,
    unanswered: usize,
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
                            scopes: Some(scopes),
                            ..Acknowledged::default()
                        },
                    );
                    ledger.acknowledged += 1;
                    mine.push(id);
                }
                Outcome::Answered(status, body) if status.is_client_error() => {
                    panic!("create refused: {status} {body}")
                }
                _ => ledger.unanswered += 1,
            }
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
            let entry = ledger.keys.get_mut(&id).expect("own key");
            let already_revoked = entry.revoked || entry.revoke_in_doubt;
            match answer {
                Outcome::Answered(status, _) if status.is_success() => {
                    if revoke {
                        entry.revoked = true;
                    } else if !entry.in_doubt {
                        entry.scopes = Some(scopes);
                    }
                    ledger.acknowledged += 1;
                }
                // Changing a revoked key is refused (409): expected once a revoke may have landed.
                Outcome::Answered(StatusCode::CONFLICT, _) if already_revoked => {}
                Outcome::Answered(status, body) if status.is_client_error() => {
                    panic!("change of {id} refused: {status} {body}")
                }
                _ => {
                    if revoke {
                        entry.revoke_in_doubt = true;
                    } else {
                        entry.in_doubt = true;
                        entry.scopes = None;
                    }
                    ledger.unanswered += 1;
                }
            }
            if revoke {
                mine.retain(|k| *k != id);
            }
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
    let mut stack = Stack::start(&[("ORIGIN_LISTEN", &listen), ("KV_RETRY_MAX_MS", "200")]).await;
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
    let out = stack.origin.run_command(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "audit chain after crashes: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // At the edge, once the outbox has drained: the same answers.
    let drained = Instant::now();
    stack.wait_published(Duration::from_secs(60)).await;
    let drain = drained.elapsed();
    let mut edge_checked = 0;
    for ack in ledger.keys.values() {
        if ack.revoke_in_doubt && !ack.revoked {
            continue;
        }
        let expected = if ack.revoked { "REVOKED" } else { "VALID" };
        // A live key with certain scopes must also hold them at the edge.
        let required: Vec<&str> = match (&ack.scopes, ack.revoked || ack.revoke_in_doubt) {
            (Some(scopes), false) => scopes.iter().map(String::as_str).collect(),
            _ => Vec::new(),
        };
        eventually(Duration::from_secs(10), || async {
            let r = stack.edge.verify(&ack.secret, &required).await;
            if r.body["code"] == expected {
                Ok(())
            } else {
                Err(format!(
                    "edge says {} for a key acknowledged {expected}",
                    r.body
                ))
            }
        })
        .await;
        edge_checked += 1;
    }
    report_measurement(&format!(
        "crash: {rounds} SIGKILLs in {:.1} s under 6 concurrent clients; {} changes acknowledged, {} unanswered; \
         {} keys checked at origin ({checked_revocations} acknowledged revocations), {edge_checked} at the edge; \
         outbox drained {:.1} s after the last restart; 0 lost",
        started.elapsed().as_secs_f64(),
        ledger.acknowledged,
        ledger.unanswered,
        ledger.keys.len(),
        drain.as_secs_f64(),
    ));
    assert!(
        ledger.acknowledged > usize::try_from(rounds).expect("u32") * 2,
        "the load was real: {} acknowledged",
        ledger.acknowledged
    );
    assert!(
        checked_revocations > 0,
        "some revocations were acknowledged"
    );
}

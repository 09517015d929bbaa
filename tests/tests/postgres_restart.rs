//! The database restarted under load: origin on PostgreSQL answers 503 while the server is
//! down, recovers by itself when it returns, and loses nothing it acknowledged.

#![allow(clippy::expect_used, clippy::panic, reason = "test code")]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::postgres::Cluster;
use common::{TestApp, eventually};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_under_load_answers_503_recovers_and_loses_nothing() {
    let cluster = Cluster::start();
    let url = common::fresh_postgres_database(&cluster.url()).await;
    let app = TestApp::builder().env("DATABASE_URL", &url).start().await;
    let (existing, secret) = app.create_key("acme", &[]).await;

    // Clients create keys without pause; every answer is kept.
    let until = Instant::now() + Duration::from_secs(6);
    let clients: Vec<_> = (0..4)
        .map(|n| {
            let base = app.base.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut answers: Vec<(StatusCode, Option<String>)> = Vec::new();
                let mut i = 0;
                while Instant::now() < until {
                    i += 1;
                    let r = http
                        .post(format!("{base}/v1/api_keys"))
                        .bearer_auth(common::ADMIN_TOKEN)
                        .json(&json!({ "name": format!("c{n}-{i}"), "subject": "load" }))
                        .timeout(Duration::from_secs(15))
                        .send()
                        .await
                        .expect("origin answers throughout");
                    let status = r.status();
                    let body: serde_json::Value = r.json().await.expect("a JSON body");
                    answers.push((status, body["id"].as_str().map(str::to_owned)));
                    if status != StatusCode::CREATED {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                answers
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cluster.stop();
    let stopped = Instant::now();
    // While it is down: a clean 503 for reads and writes, never a 500.
    let down = app.get(&format!("/v1/api_keys/{existing}")).await;
    assert_eq!(
        down.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        down.body
    );
    let verify = app.verify(&secret, &[]).await;
    assert_eq!(
        verify.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        verify.body
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_again();
    let restarted = Instant::now();
    let downtime = restarted - stopped;
    let recovered = eventually(Duration::from_secs(30), || async {
        let r = app.verify(&secret, &[]).await;
        (r.status == StatusCode::OK)
            .then(Instant::now)
            .ok_or_else(|| format!("{} {}", r.status, r.body))
    })
    .await;

    let mut by_status = BTreeMap::<u16, usize>::new();
    let mut acknowledged = Vec::new();
    for client in clients {
        for (status, id) in client.await.expect("client") {
            *by_status.entry(status.as_u16()).or_default() += 1;
            if status == StatusCode::CREATED {
                acknowledged.push(id.expect("an id"));
            }
        }
    }
    assert!(
        by_status.keys().all(|s| [201, 503].contains(s)),
        "only 201 and 503: {by_status:?}\n{}",
        app.logs()
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains(" 500"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(by_status.get(&503).is_some_and(|n| *n > 0), "{by_status:?}");
    // Every acknowledged create is there, without restarting origin.
    for id in &acknowledged {
        let key = app.get(&format!("/v1/api_keys/{id}")).await;
        assert_eq!(
            key.status,
            StatusCode::OK,
            "acknowledged {id}: {}",
            key.body
        );
    }
    let verified = app.run_command(&["audit", "verify"]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    common::edge::report_measurement(&format!(
        "database restart under load (PostgreSQL down {} ms): answers {by_status:?}; {} \
         acknowledged creates all kept; origin served again {} ms after the server was back, \
         without a restart",
        downtime.as_millis(),
        acknowledged.len(),
        recovered.duration_since(restarted).as_millis()
    ));
    assert!(!app.logs().contains("panicked"));
}

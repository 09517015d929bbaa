//! No secret at rest: after a full run (create on both surfaces, verify at origin and at the edge,
//! the gateway, update, revoke, roll on both surfaces, a GitHub secret scanning alert and a manual
//! leak report, event webhooks to an endpoint that never answers, usage reports, admin token
//! rotation, `sync --full`) and its failure paths (a KV record the edge cannot read, the upstream
//! down, wrong admin tokens up to 429, the database locked so writes answer 503), every issued key,
//! every 12-character window of every key's random body, every admin token, both signing secrets
//! and the audit chain key are searched for in the database file and its WAL, the audit
//! checkpoints, every log at its most verbose level (origin at `trace`, wrangler at `debug` and its
//! own debug log files, the upstream, `sync`), every file of the Worker's local KV, wrangler's
//! `.wrangler/` folder and the audit log; so is anything shaped like a key, which would catch a key
//! the test never saw (one made by a create that failed). Zero hits, with positive controls proving
//! the scan reads the right places.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a failed test"
)]

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::edge::{
    KV_NAMESPACE_ID, LEDGER_SECRET, Stack, UPSTREAM_SECRET, USAGE_SECRET, free_port, repo_root,
    report_measurement, unissued_key,
};
use common::github::{ALERTS, GithubKey, write_key_file};
use common::{ADMIN_TOKEN, AUDIT_CHAIN_KEY, TestApp, contains_bytes, files_under};
use latchkey_shared::{ApiKey, kv_entry_name};
use reqwest::{Method, StatusCode};
use serde_json::json;

/// The length of the key-body fragments searched for. A key's body is 32 random base62
/// characters; every window of 12 of them is searched, so any leak of 12 or more consecutive
/// characters is caught. 12 base62 characters carry ~71 bits: the chance that one of the ~150
/// windows (7 keys × 21) turns up by accident in the ~2 MB scanned is about
/// 150 × 2·10^6 / 62^12 ≈ 10^-13, where 8 characters (~48 bits) would leave ~10^-6, less margin
/// on text that is not random (hex hashes, base64 in bundles).
const FRAGMENT: usize = 12;

/// Every `FRAGMENT`-byte window of each key body, and which key it belongs to.
fn fragments(bodies: &[&str]) -> Vec<(Vec<u8>, usize)> {
    bodies
        .iter()
        .enumerate()
        .flat_map(|(i, body)| {
            body.as_bytes()
                .windows(FRAGMENT)
                .map(move |w| (w.to_vec(), i))
        })
        .collect()
}

/// The keys (by index) any of whose fragments occur in `haystack`: one pass over it.
fn fragments_in(haystack: &[u8], fragments: &[(Vec<u8>, usize)]) -> Vec<usize> {
    let set: HashSet<&[u8]> = fragments.iter().map(|(f, _)| f.as_slice()).collect();
    let mut found: Vec<usize> = haystack
        .windows(FRAGMENT)
        .filter(|w| set.contains(w))
        .flat_map(|w| {
            fragments
                .iter()
                .filter(move |(f, _)| f.as_slice() == w)
                .map(|(_, i)| *i)
        })
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// Anything shaped like an issued key: `sk_live_` and 38 base62 characters.
fn key_shaped(haystack: &[u8]) -> usize {
    let prefix = b"sk_live_";
    haystack
        .windows(prefix.len() + 38)
        .filter(|w| {
            w.starts_with(prefix) && w[prefix.len()..].iter().all(u8::is_ascii_alphanumeric)
        })
        .count()
}

/// Holds SQLite's write lock on `db` (from Python's sqlite3 module) until dropped, so origin's
/// writes wait out their busy timeout and answer 503.
struct WriteLock(std::process::Child);

impl WriteLock {
    fn take(db: &std::path::Path) -> Self {
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import sqlite3, sys\n\
                 c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
                 c.execute('BEGIN IMMEDIATE')\n\
                 print('locked', flush=True)\n\
                 sys.stdin.read()\n\
                 c.execute('ROLLBACK')",
            ])
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        assert_eq!(line.trim(), "locked", "python3 took the write lock");
        Self(child)
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

const SECOND_ADMIN_TOKEN: &str = "rotated-admin-token-eeeeeeeeeeeeeeeeeeeeeeee";

/// The event webhooks' secret in this run.
const WEBHOOK_SECRET: &str = "whsec_Tm90QVJlYWxTZWNyZXRCdXRMb25nRW5vdWdoMTIzNDU2";
/// A token in the webhook endpoint's path, as some receivers take one.
const WEBHOOK_PATH_TOKEN: &str = "hooktoken0123456789abcdefXYZ";

#[tokio::test]
async fn no_secret_or_admin_token_is_stored_logged_or_published() {
    let both = format!("{ADMIN_TOKEN},{SECOND_ADMIN_TOKEN}");
    // Webhooks to an endpoint that never answers, its URL's path holding a token as some
    // receivers' do: deliveries fail and are retried, and neither the secret nor the token may
    // show anywhere.
    let webhook_url = format!(
        "http://127.0.0.1:{}/hooks/{WEBHOOK_PATH_TOKEN}",
        free_port()
    );
    let github = GithubKey::new("github");
    let github_dir = tempfile::tempdir().expect("dir");
    let github_keys = write_key_file(github_dir.path(), &[&github])
        .display()
        .to_string();
    // The isolate forgets records a second after the ledger does, so the KV failure path
    // below is reached with a real key too.
    let mut stack = Stack::start_with(
        &[
            ("ADMIN_TOKEN", &both),
            ("ADMIN_AUTH_FAILURES_PER_MINUTE", "3"),
            ("GITHUB_SECRET_SCANNING_KEYS_FILE", &github_keys),
            ("WEBHOOK_URLS", &webhook_url),
            ("WEBHOOK_SECRET", WEBHOOK_SECRET),
            ("WEBHOOK_RETRY_MAX_MS", "200"),
        ],
        // Version 2's identity headers, as for an upstream not yet upgraded to version 3.
        &[
            ("LEDGER_RETENTION_MS", "1000"),
            ("MEMORY_TTL_MS", "1000"),
            ("UPSTREAM_SIGNATURE_VERSION", "2"),
        ],
    )
    .await;
    let mut secrets: Vec<String> = Vec::new();
    let mut ids: Vec<String> = Vec::new();

    // Issue keys on both surfaces.
    for i in 0..3 {
        let (id, key) = stack
            .create(&["read:orders"], json!({"name": format!("tutorial-{i}")}))
            .await;
        ids.push(id);
        secrets.push(key);
        let (id, key) = stack
            .origin
            .create_key(&format!("clerk-{i}"), &["read:orders", "write:orders"])
            .await;
        ids.push(id);
        secrets.push(key);
    }
    stack.wait_published(Duration::from_secs(20)).await;

    // Use them: origin verify on both surfaces, edge verify, the gateway (usage flows back).
    for key in &secrets {
        assert_eq!(
            stack.origin.verify(key, &["read:orders"]).await.status,
            StatusCode::OK
        );
        let r = stack
            .origin
            .post("/backend.api-keys.verify", json!({"key": key}))
            .await;
        assert_eq!(r.body["valid"], true);
        assert_eq!(
            stack.edge.verify(key, &["read:orders"]).await.body["valid"],
            true
        );
        let g = stack
            .edge
            .gateway(Method::GET, "/orders/7", Some(key))
            .await;
        assert_eq!(g.status, StatusCode::OK, "{}", g.body);
        let forms = g.body["identity_headers"].as_object().map(|h| h.len());
        assert_eq!(forms, Some(8), "version 2: eight headers, {}", g.body);
    }
    // Failed attempts log too: a near-miss key.
    let near_miss = format!("{}x", &secrets[0][..secrets[0].len() - 1]);
    stack.origin.verify(&near_miss, &[]).await;
    stack.edge.verify(&near_miss, &[]).await;

    // Failure paths, each with a real key presented.
    // KV holds a record the edge cannot read: 503 kv_unavailable at verify and the gateway.
    // (`sync --full` below writes the true record back.)
    let entry = kv_entry_name(&ApiKey::parse(&secrets[2]).expect("key").hash());
    stack.edge.write_kv(&entry, b"{not json").await;
    // Once the isolate's memory no longer holds the key (a second or two), KV is read.
    let r = common::eventually(Duration::from_secs(15), || async {
        let r = stack.edge.verify(&secrets[2], &[]).await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            Ok(r)
        } else {
            Err(format!("still answered from memory: {}", r.body))
        }
    })
    .await;
    assert_eq!(r.body["error"]["code"], "kv_unavailable");
    let g = stack
        .edge
        .gateway(Method::GET, "/orders/7", Some(&secrets[2]))
        .await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE, "{}", g.body);
    // The upstream is down: 502 upstream_unavailable.
    stack.upstream.stop();
    let g = stack
        .edge
        .gateway(Method::GET, "/orders/7", Some(&secrets[4]))
        .await;
    assert_eq!(g.status, StatusCode::BAD_GATEWAY, "{}", g.body);
    assert_eq!(g.body["error"]["code"], "upstream_unavailable");
    // Wrong admin tokens (a partner key sent as one, a near miss of the admin token, a
    // malformed header) until origin answers 429.
    let admin_near_miss = format!("{}b", &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]);
    let mut statuses = Vec::new();
    for header in [
        format!("Bearer {}", secrets[4]),
        format!("Bearer {admin_near_miss}"),
        format!("Basic {}", secrets[5]),
        format!("Bearer {}", secrets[5]),
    ] {
        let r = TestApp::send(
            stack
                .origin
                .request(Method::GET, "/v1/api_keys")
                .header("authorization", header),
        )
        .await;
        statuses.push(r.status.as_u16());
    }
    assert_eq!(statuses, [401, 401, 401, 429]);
    // The database is locked: writes wait out the busy timeout and answer 503 (a create's new
    // key is made and then lost; the key-shaped search below would find it anywhere).
    {
        let _lock = WriteLock::take(&stack.origin.db_path());
        let revoke_path = format!("/v1/api_keys/{}/revoke", ids[5]);
        let (create, revoke) = tokio::join!(
            stack.origin.post(
                "/v1/api_keys",
                json!({"name": "during the lock", "subject": "acme"})
            ),
            stack
                .origin
                .post(&revoke_path, json!({"revocation_reason": "locked"})),
        );
        for r in [create, revoke] {
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
            assert_eq!(r.body["errors"][0]["code"], "storage_unavailable");
        }
    }

    // Change and revoke.
    stack
        .origin
        .patch(
            &format!("/v1/api_keys/{}", ids[1]),
            json!({"scopes": ["read:orders"]}),
        )
        .await;
    stack.revoke(&ids[0]).await;
    let r = stack
        .origin
        .post(
            &format!("/v1/api_keys/{}/revoke", ids[3]),
            json!({"revocation_reason": "leaked"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // Roll, on both surfaces: the new secrets are searched for too, and verified once.
    let rolled = stack
        .origin
        .post(
            &format!("/v1/api_keys/{}/roll", ids[2]),
            json!({"grace_period_seconds": 600}),
        )
        .await;
    assert_eq!(rolled.status, StatusCode::CREATED, "{}", rolled.body);
    secrets.push(rolled.body["secret"].as_str().expect("secret").to_owned());
    let rolled = stack
        .origin
        .post(
            "/backend.api-keys.roll",
            json!({"key_id": rolled.body["id"], "grace_period_seconds": 0}),
        )
        .await;
    assert_eq!(rolled.status, StatusCode::OK, "{}", rolled.body);
    secrets.push(rolled.body["key"].as_str().expect("key").to_owned());
    for secret in &secrets[secrets.len() - 2..] {
        stack.origin.verify(secret, &[]).await;
    }
    // A GitHub secret scanning alert holding a live key (raw, as GitHub sends it) and one that
    // is not ours, and a manual leak report.
    let alert = json!([
        {"token": secrets[1], "type": "latchkey_api_key", "url": "https://github.com/o/r/blob/x/f"},
        {"token": unissued_key("sk_live"), "type": "latchkey_api_key"},
    ])
    .to_string();
    let http = reqwest::Client::new();
    let r = TestApp::send(github.signed(
        http.post(format!("{}{ALERTS}", stack.origin.base)),
        alert.as_bytes(),
    ))
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body[0]["label"], "true_positive");
    let r = stack
        .origin
        .post(
            &format!("/v1/api_keys/{}/leak", ids[4]),
            json!({"source": "a pastebin"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // Rotate admin tokens: the second one alone, the first refused.
    stack.origin.set_env("ADMIN_TOKEN", SECOND_ADMIN_TOKEN);
    stack.origin.restart().await;
    let http = reqwest::Client::new();
    let with = |token: &str| {
        http.get(format!(
            "{}/v1/api_keys?limit=100&include_invalid=true",
            stack.origin.base
        ))
        .bearer_auth(token)
    };
    assert_eq!(
        TestApp::send(with(ADMIN_TOKEN)).await.status,
        StatusCode::UNAUTHORIZED
    );
    let listed = TestApp::send(with(SECOND_ADMIN_TOKEN)).await;
    assert_eq!(listed.status, StatusCode::OK);
    let created = TestApp::send(
        http.post(format!("{}/v1/api_keys", stack.origin.base))
            .bearer_auth(SECOND_ADMIN_TOKEN)
            .json(&json!({"name": "after rotation", "subject": "acme"})),
    )
    .await;
    secrets.push(created.body["secret"].as_str().expect("secret").to_owned());

    // A full sync into the same namespace, with its own log at trace level.
    let kv_env = [
        ("KV_API_BASE", stack.edge.kv_api_base()),
        ("KV_NAMESPACE_ID", KV_NAMESPACE_ID.to_owned()),
        ("RUST_LOG", "trace".to_owned()),
    ];
    let kv_env: Vec<(&str, &str)> = kv_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let sync = stack.origin.run_command_with(&["sync", "--full"], &kv_env);
    assert!(
        sync.status.success(),
        "{}",
        String::from_utf8_lossy(&sync.stderr)
    );
    stack.wait_published(Duration::from_secs(20)).await;
    // Let usage reports arrive and flush, then stop cleanly so every log is complete.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let audit = TestApp::send(
        http.get(format!("{}/v1/audit_log?limit=500", stack.origin.base))
            .bearer_auth(SECOND_ADMIN_TOKEN),
    )
    .await;
    assert_eq!(audit.status, StatusCode::OK);
    let db_files: Vec<PathBuf> = ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| PathBuf::from(format!("{}{suffix}", stack.origin.db_path().display())))
        .filter(|p| p.exists())
        .collect();
    let running_db: Vec<(String, Vec<u8>)> = db_files
        .iter()
        .map(|p| {
            (
                format!("{} (running)", p.display()),
                std::fs::read(p).expect("read"),
            )
        })
        .collect();
    // wrangler's own folder in the project (`.wrangler/tmp`: the bundles it runs), read while
    // it runs, since it empties the folder when it stops; other tests' runs may add or remove
    // files meanwhile, so a file that vanished is skipped.
    let read_dot_wrangler = |when: &str| -> Vec<(String, Vec<u8>)> {
        files_under(&repo_root().join(".wrangler"))
            .iter()
            .filter_map(|p| {
                std::fs::read(p)
                    .ok()
                    .map(|bytes| (format!("{} ({when})", p.display()), bytes))
            })
            .collect()
    };
    let mut dot_wrangler = read_dot_wrangler("running");
    let dot_wrangler_running = dot_wrangler.len();
    stack.origin.stop().await;
    stack.edge.stop();
    dot_wrangler.extend(read_dot_wrangler("stopped"));

    // Everything to scan.
    let mut scanned: Vec<(String, Vec<u8>)> = running_db;
    for p in files_under(stack.origin.db_path().parent().expect("dir")) {
        scanned.push((p.display().to_string(), std::fs::read(&p).expect("read")));
    }
    for p in files_under(&stack.edge.state_dir()) {
        scanned.push((p.display().to_string(), std::fs::read(&p).expect("read")));
    }
    scanned.push(("wrangler logs".into(), stack.edge.logs().into_bytes()));
    let debug_logs = files_under(&stack.edge.debug_log_dir());
    for p in &debug_logs {
        scanned.push((p.display().to_string(), std::fs::read(p).expect("read")));
    }
    scanned.extend(dot_wrangler);
    scanned.push((
        "origin sync output".into(),
        [sync.stdout.clone(), sync.stderr.clone()].concat(),
    ));
    scanned.push((
        "audit log (API)".into(),
        audit.body.to_string().into_bytes(),
    ));
    scanned.push(("upstream log".into(), stack.upstream.log().into_bytes()));

    let mut needles: Vec<(String, String)> = Vec::new();
    let mut bodies: Vec<&str> = Vec::new();
    for (i, s) in secrets.iter().enumerate() {
        needles.push((format!("issued key #{i}"), s.clone()));
        // The random body alone (without prefix or checksum) must not appear either, nor any
        // 12 characters of it.
        let body = &s[s.rfind('_').expect("prefix") + 1..][..32];
        needles.push((format!("body of issued key #{i}"), body.to_owned()));
        bodies.push(body);
    }
    needles.push(("near miss of admin token 1".into(), admin_near_miss.clone()));
    needles.push(("admin token 1".into(), ADMIN_TOKEN.into()));
    needles.push(("admin token 2".into(), SECOND_ADMIN_TOKEN.into()));
    needles.push(("usage signing secret".into(), USAGE_SECRET.into()));
    needles.push(("ledger signing secret".into(), LEDGER_SECRET.into()));
    needles.push(("upstream signing secret".into(), UPSTREAM_SECRET.into()));
    needles.push(("audit chain key".into(), AUDIT_CHAIN_KEY.into()));
    needles.push((
        "webhook secret".into(),
        WEBHOOK_SECRET.trim_start_matches("whsec_").into(),
    ));
    needles.push(("token in a webhook URL".into(), WEBHOOK_PATH_TOKEN.into()));

    let fragments = fragments(&bodies);
    // The fragment search finds what it looks for (a control on the matcher itself).
    let planted = format!("log line ... {} ...", &bodies[3][7..7 + FRAGMENT]);
    assert_eq!(fragments_in(planted.as_bytes(), &fragments), [3]);
    assert_eq!(key_shaped(format!("x{}x", secrets[0]).as_bytes()), 1);

    let mut hits = Vec::new();
    for (place, bytes) in &scanned {
        for (what, needle) in &needles {
            if contains_bytes(bytes, needle.as_bytes()) {
                hits.push(format!("{what} in {place}"));
            }
        }
        for key in fragments_in(bytes, &fragments) {
            hits.push(format!(
                "{FRAGMENT} characters of the body of issued key #{key} in {place}"
            ));
        }
        let shaped = key_shaped(bytes);
        if shaped > 0 {
            hits.push(format!("{shaped} key-shaped strings in {place}"));
        }
    }
    assert!(hits.is_empty(), "secrets found: {hits:#?}");

    // Positive controls: the scan reads the places where the keys' traces really are.
    let all: Vec<u8> = scanned.iter().flat_map(|(_, b)| b.clone()).collect();
    let origin_logs = stack.origin.logs();
    assert!(
        origin_logs.contains("TRACE"),
        "origin logged at trace level"
    );
    assert!(
        stack.edge.logs().to_lowercase().contains("debug"),
        "wrangler logged at debug level"
    );
    // The failure paths happened and left their lines where the scan read.
    let debug_bytes: Vec<u8> = debug_logs
        .iter()
        .flat_map(|p| std::fs::read(p).expect("read"))
        .collect();
    assert!(
        !debug_logs.is_empty() && contains_bytes(&debug_bytes, b"dev"),
        "wrangler wrote its debug log files to WRANGLER_LOG_PATH: {debug_logs:?}"
    );
    let edge_lines = stack.edge.logs();
    assert!(edge_lines.contains("verify denied"), "KV fault logged");
    assert!(
        edge_lines.contains("upstream request failed"),
        "upstream fault logged"
    );
    assert!(origin_logs.contains("admin authentication failed"));
    assert!(
        origin_logs.contains("database is locked"),
        "storage fault logged"
    );
    assert!(
        dot_wrangler_running > 0,
        "the .wrangler folder was scanned while wrangler ran"
    );
    for id in &ids {
        assert!(
            contains_bytes(&all, id.as_bytes()),
            "key id {id} appears somewhere scanned"
        );
    }
    let kv_files = files_under(&stack.edge.state_dir());
    let kv_bytes: Vec<u8> = kv_files
        .iter()
        .flat_map(|p| std::fs::read(p).expect("read"))
        .collect();
    assert!(
        contains_bytes(&kv_bytes, ids[2].as_bytes()),
        "KV's files hold the published records"
    );
    let bytes: usize = scanned.iter().map(|(_, b)| b.len()).sum();
    for (what, needle) in &needles {
        assert!(
            !origin_logs.contains(needle.as_str()),
            "{what} in origin's logs"
        );
    }
    report_measurement(&format!(
        "secrets: {} secrets and tokens, {} key-body fragments of {FRAGMENT} characters and any key-shaped string searched in {} files and logs ({:.1} MB; origin at trace, wrangler at debug with {} debug log files, {} files of .wrangler/; after KV, upstream, 429 and storage faults): 0 found",
        needles.len(),
        fragments.len(),
        scanned.len(),
        bytes as f64 / 1e6,
        debug_logs.len(),
        dot_wrangler_running,
    ));
}

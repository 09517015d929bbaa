//! The edge with the change ledger on (issue 13), under Miniflare: hot keys answered from the
//! isolate's memory, the ledger fetches an isolate makes under load, and the driver standing in
//! for origin (signed appends: the key's record, then a fresh watermark every 500 ms).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use latchkey_shared::ledger::{APPEND_PATH, AppendBatch, Change, append_message};
use latchkey_shared::{KeyRecord, UnixMillis};
use serde_json::json;

use crate::load::{Load, Run};
use crate::{Fixture, Mode, Report, Row, ratio_row};

/// The Workers' `LEDGER_SIGNING_SECRET` in the bench (distinct from the upstream secret, as the
/// Worker requires).
pub(crate) const LEDGER_SECRET: &str = "bench-ledger-secret-00000000000000000000";

/// How often the driver, standing in for origin, sends a fresh watermark.
const WATERMARK_EVERY: Duration = Duration::from_millis(500);

/// The Worker's default `LEDGER_POLL_MS` (wrangler.toml), which the bench leaves as it is.
const POLL: Duration = Duration::from_millis(1000);

/// How long the sustained load runs while the ledger fetches are counted.
const FETCH_WINDOW: Duration = Duration::from_secs(10);

/// One HTTP/1.1 exchange over a fresh connection (`Connection: close`): the status and the
/// response headers (names lowercased); the body is not read. Small and dependency-free: the driver only needs it for
/// appends and single probes, never for load.
fn exchange(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    // Only the head is needed. workerd keeps the connection open for a while after answering
    // despite `connection: close`, so reading to the end would wait seconds for nothing.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// One signed append to the Worker at `base`, as origin sends it: `changes` and a watermark of
/// now. Returns the status.
fn append(base: &str, changes: Vec<Change>) -> u16 {
    let at = UnixMillis(now_ms());
    let body = serde_json::to_vec(&AppendBatch::new(changes, Some(at))).expect("append body");
    let signature =
        latchkey_shared::sign::sign(LEDGER_SECRET.as_bytes(), &append_message(at, &body));
    let headers = [
        ("content-type", "application/json".to_owned()),
        ("x-latchkey-timestamp", at.0.to_string()),
        ("x-latchkey-signature", signature),
    ];
    exchange(base, "POST", APPEND_PATH, &headers, &body).map_or(0, |(status, _)| status)
}

/// Origin's part, played by the driver: the key's record appended once, then a signed empty
/// batch with a fresh watermark every [`WATERMARK_EVERY`] to each Worker, until dropped.
struct Appender {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    /// The longest time between two accepted watermarks at one Worker, in milliseconds: memory
    /// is trusted only while it stays under `WATERMARK_MAX_AGE_MS` (5,000).
    longest_gap_ms: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Appender {
    fn start(bases: &[&str], fixture: &Fixture) -> Self {
        let record =
            KeyRecord::from_json(fixture.record_json.as_bytes()).expect("the key's record");
        for base in bases {
            let change = Change {
                name: fixture.record_name.clone(),
                record: record.clone(),
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            while append(base, vec![change.clone()]) != 200 {
                assert!(
                    Instant::now() < deadline,
                    "the ledger at {base} did not take the key's record"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let longest_gap_ms = Arc::new(AtomicU64::new(0));
        let bases: Vec<String> = bases.iter().map(|b| (*b).to_owned()).collect();
        let thread = {
            let (stop, failures, longest) =
                (stop.clone(), failures.clone(), longest_gap_ms.clone());
            std::thread::spawn(move || {
                let mut accepted = vec![Instant::now(); bases.len()];
                while !stop.load(Ordering::Relaxed) {
                    for (base, last) in bases.iter().zip(&mut accepted) {
                        if append(base, Vec::new()) == 200 {
                            let gap = u64::try_from(last.elapsed().as_millis()).unwrap_or(u64::MAX);
                            longest.fetch_max(gap, Ordering::Relaxed);
                            *last = Instant::now();
                        } else {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(WATERMARK_EVERY);
                }
            })
        };
        Self {
            stop,
            failures,
            longest_gap_ms,
            thread: Some(thread),
        }
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the debug headers said of one request.
struct Probe {
    memory: String,
    kv_reads: u64,
    ledger_fetches: u64,
}

fn probe(base: &str, load: &Load) -> Probe {
    let (method, path, headers, body) = load.parts();
    let headers: Vec<(&str, String)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.clone()))
        .collect();
    let (status, answer) = exchange(base, method, path, &headers, body.as_bytes())
        .unwrap_or_else(|e| panic!("{method} {base}{path}: {e}"));
    assert_eq!(status, 200, "{method} {base}{path}");
    let header = |name: &str| {
        answer
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{method} {base}{path}: no {name} header"))
    };
    Probe {
        memory: header("x-latchkey-debug-memory"),
        kv_reads: header("x-latchkey-debug-kv-reads")
            .parse()
            .unwrap_or(u64::MAX),
        ledger_fetches: header("x-latchkey-debug-ledger-fetches")
            .parse()
            .unwrap_or(u64::MAX),
    }
}

/// Probes until memory answers (a cold isolate first waits for its first poll), for up to 30 s.
fn probe_hot(base: &str, load: &Load) -> Probe {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = probe(base, load);
        if p.memory == "hit" || Instant::now() > deadline {
            return p;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Our Worker with the ledger, its debug twin, and what they are compared with.
pub(crate) struct LedgerUnderTest {
    /// Our Worker with the ledger on, `DEBUG_HEADERS` off: measured.
    pub(crate) edge: String,
    /// The same with `DEBUG_HEADERS` on (and its own ledger): checked and counted.
    pub(crate) debug: String,
    /// A constant body, no KV read: the ceiling for hot-key verify.
    pub(crate) constant: String,
    /// One upstream fetch, no KV read: the floor under the gateway when memory answers.
    pub(crate) fetch_only: String,
}

/// Hot-key verify and gateway with the ledger, against the constant Worker and the fetch-only
/// floor (interleaved rounds, as everywhere); the debug twin's word that the hot path read no
/// KV; the ledger fetches per second of one isolate under sustained load.
pub(crate) fn measure(report: &mut Report, mode: Mode, at: &LedgerUnderTest, fixture: &Fixture) {
    let appender = Appender::start(&[&at.edge, &at.debug], fixture);
    let secret = &fixture.secret;
    let verify = Load::post(
        &format!("{}/v1/api_keys/verify", at.edge),
        &json!({ "key": secret }).to_string(),
    )
    .header("content-type", "application/json");
    let gateway = Load::get(&format!("{}/orders/42", at.edge))
        .header("authorization", &format!("Bearer {secret}"));

    // The check, in warm-up requests to the debug twin (not in the measured load).
    let checked = [("verify", &verify), ("gateway", &gateway)].map(|(what, load)| {
        let p = probe_hot(&at.debug, load);
        (what, p.memory == "hit" && p.kv_reads == 0, p)
    });
    report.row(Row {
        figure: "edge with the ledger, hot key: the debug twin's headers (warm-up request)".into(),
        value: checked
            .iter()
            .map(|(what, _, p)| format!("{what}: memory {}, {} KV reads", p.memory, p.kv_reads))
            .collect::<Vec<_>>()
            .join("; "),
        ceiling: String::new(),
        ratio: None,
        target: "memory hit, 0 KV reads".into(),
        pass: Some(checked.iter().all(|(_, ok, _)| *ok)),
    });

    // The ceiling's run right before its load's, in every round.
    let loads = [
        verify.sent_to(&at.constant),
        verify.clone(),
        gateway.sent_to(&at.fetch_only),
        gateway.clone(),
    ];
    for load in &loads {
        load.run(Duration::from_secs(1));
    }
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); loads.len()];
    for _ in 0..mode.rounds() {
        for (i, load) in loads.iter().enumerate() {
            runs[i].push(load.run(mode.duration()));
        }
    }
    let runner = "Miniflare (workerd direct)";
    let mut row = ratio_row(
        &format!("edge verify, valid key, hot in ledger memory — {runner}"),
        &runs[1],
        &runs[0],
        "req/s",
        0.90,
    );
    row.ceiling = format!("{} (constant body)", row.ceiling);
    report.row(row);
    let mut row = ratio_row(
        &format!("edge gateway, valid key, hot in ledger memory — {runner}"),
        &runs[3],
        &runs[2],
        "req/s",
        0.90,
    );
    row.ceiling = format!("{} (one upstream fetch, no KV)", row.ceiling);
    report.row(row);

    // Ledger fetches of the debug twin's one isolate across a sustained load.
    let sustained = verify.sent_to(&at.debug);
    let (before, started) = (probe(&at.debug, &verify), Instant::now());
    let run = sustained.run(FETCH_WINDOW);
    let (after, took) = (probe(&at.debug, &verify), started.elapsed());
    let fetches = after.ledger_fetches.saturating_sub(before.ledger_fetches);
    let seconds = took.as_secs_f64();
    let intervals = (seconds / POLL.as_secs_f64()).floor() + 1.0;
    report.row(Row {
        figure: format!(
            "edge with the ledger: ledger fetches of one isolate under {:.0} s of verify load",
            FETCH_WINDOW.as_secs_f64()
        ),
        value: format!(
            "{fetches} in {seconds:.1} s = {:.2}/s ({:.0} req/s served)",
            fetches as f64 / seconds,
            run.rps
        ),
        ceiling: format!(
            "1 per poll ({:.0} ms): {:.2}/s",
            POLL.as_millis(),
            1.0 / POLL.as_secs_f64()
        ),
        ratio: Some(fetches as f64 / seconds * POLL.as_secs_f64()),
        target: "at most one per poll interval".into(),
        pass: Some(fetches as f64 <= intervals),
    });
    let failures = appender.failures.load(Ordering::Relaxed);
    let longest = appender.longest_gap_ms.load(Ordering::Relaxed);
    drop(appender);
    report.notes.push(format!(
        "Edge with the ledger: the driver, standing in for origin, appended a fresh watermark \
         every {} ms to each ledger; {failures} of those appends failed, and the longest time \
         between two accepted ones at one Worker was {longest} ms (memory is trusted while it \
         stays under 5,000 ms).",
        WATERMARK_EVERY.as_millis(),
    ));
}

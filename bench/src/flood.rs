//! 7. The open routes under a flood, during a backlog: origin with `n` changes waiting for an
//!    unreachable KV, appending watermarks to a recording ledger route, first alone and then
//!    while 250 keep-alive connections ask `/healthz` as fast as they can. The figure is the
//!    gap between two watermarks the ledger received: the edge trusts its memory only while the
//!    newest watermark is at most `WATERMARK_MAX_AGE_MS` (3 s) old, so a gap over that makes
//!    every isolate fall back to KV (or answer 503 under `LEDGER_STRICT`). Before the open
//!    routes were cached and the publishers had connections of their own, the review measured
//!    gaps of 5.5 s with 300,000 pending rows.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use latchkey_shared::ledger::{AppendAnswer, AppendBatch, LEDGER_VERSION};

use crate::load::Load;
use crate::{Fixture, Proc, Report, Row, free_port, seed, step};

/// Rows waiting for KV during the flood (at most the fixture's keys).
const PENDING: u64 = 300_000;
/// Connections of the flood (the review's figure).
const CONNECTIONS: u32 = 250;
/// Watermarks are sent this often (`LEDGER_WATERMARK_MS`, origin's default).
const WATERMARK_EVERY_MS: u64 = 1000;
/// The edge's trust window for a watermark (`WATERMARK_MAX_AGE_MS`, its default).
const TRUST_MS: f64 = 3000.0;

pub(crate) fn measure(report: &mut Report, mode: crate::Mode, work: &Path, fixture: &Fixture) {
    let pending = PENDING.min(fixture.keys);
    step(&format!(
        "open routes under a flood ({CONNECTIONS} connections on /healthz, {pending} changes waiting for KV)"
    ));
    seed::queue_for_kv(&fixture.db, pending);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let ledger_url = runtime.block_on(recording_ledger(arrivals.clone()));

    let mut origin_cmd = crate::origin_command(fixture);
    origin_cmd
        // KV is away: the backlog stays.
        .env(
            "KV_API_BASE",
            format!("http://127.0.0.1:{}/client/v4/accounts/0", free_port()),
        )
        .env("KV_NAMESPACE_ID", "bench")
        .env("LEDGER_URL", &ledger_url)
        .env("LEDGER_SIGNING_SECRET", crate::ledger::LEDGER_SECRET)
        .env("LEDGER_WATERMARK_MS", WATERMARK_EVERY_MS.to_string());
    let (origin, line) = Proc::spawn_stderr(
        origin_cmd,
        "origin listening",
        &work.join("flood-origin.log"),
    );
    let origin_url = format!(
        "http://{}",
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("listen="))
            .expect("listen=")
    );
    // The first watermark, then a quiet stretch, then the flood, each as long.
    let started = Instant::now();
    while arrivals.lock().expect("arrivals").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "origin appended no watermark within 120 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let span = Duration::from_secs(if mode.quick { 6 } else { 20 });
    let quiet_from = Instant::now();
    std::thread::sleep(span);
    let flood_from = Instant::now();
    let flood = Load::get(&format!("{origin_url}/healthz"))
        .connections(CONNECTIONS)
        .run(span);
    let flood_to = Instant::now();
    drop(origin);

    let arrivals = arrivals.lock().expect("arrivals").clone();
    let quiet = gaps(&arrivals, quiet_from, flood_from);
    let flooded = gaps(&arrivals, flood_from, flood_to);
    let max = |g: &[f64]| g.iter().copied().fold(0.0, f64::max);
    let (quiet_max, flood_max) = (max(&quiet), max(&flooded));
    report.row(Row {
        figure: format!("watermark gap, /healthz flood ({CONNECTIONS} conns, {pending} pending)"),
        value: format!("max {flood_max:.0} ms ({:.0} req/s)", flood.rps),
        ceiling: format!("max {quiet_max:.0} ms quiet"),
        ratio: Some(flood_max / quiet_max),
        target: format!("max < {:.0} ms (trusted 3 s)", TRUST_MS * 2.0 / 3.0),
        pass: Some(flood_max < TRUST_MS * 2.0 / 3.0),
    });
    report.notes.push(format!(
        "Flood: {} watermarks in {:.0} s quiet, {} in {:.0} s of flood ({:.0} /healthz req/s); \
         the gaps are between arrivals at a recording ledger route on loopback.",
        quiet.len(),
        flood_from.duration_since(quiet_from).as_secs_f64(),
        flooded.len(),
        flood_to.duration_since(flood_from).as_secs_f64(),
        flood.rps
    ));
}

/// The gaps (ms) between consecutive arrivals, for the arrivals within `[from, to]` (the first
/// gap runs from the last arrival before `from`, so a stall at the start counts).
fn gaps(arrivals: &[Instant], from: Instant, to: Instant) -> Vec<f64> {
    let mut last = arrivals.iter().copied().rfind(|a| *a <= from);
    let mut gaps = Vec::new();
    for at in arrivals.iter().copied().filter(|a| *a > from && *a <= to) {
        if let Some(prev) = last {
            gaps.push(at.duration_since(prev).as_secs_f64() * 1000.0);
        }
        last = Some(at);
    }
    // A stall still running at the end counts up to the end.
    if let Some(prev) = last {
        gaps.push(to.duration_since(prev).as_secs_f64() * 1000.0);
    }
    gaps
}

/// A ledger route that answers every append as the Worker would and records when each
/// watermark arrived.
async fn recording_ledger(arrivals: Arc<Mutex<Vec<Instant>>>) -> String {
    let head = Arc::new(Mutex::new(0u64));
    let app = axum::Router::new().route(
        latchkey_shared::ledger::APPEND_PATH,
        axum::routing::post(move |body: axum::body::Bytes| {
            let (arrivals, head) = (arrivals.clone(), head.clone());
            async move {
                let Ok(batch) = AppendBatch::parse(&body) else {
                    return (axum::http::StatusCode::BAD_REQUEST, String::new());
                };
                if batch.watermark.is_some() {
                    arrivals.lock().expect("arrivals").push(Instant::now());
                }
                let mut head = head.lock().expect("head");
                *head += batch.changes.len() as u64;
                let answer = AppendAnswer {
                    v: LEDGER_VERSION,
                    appended: batch.changes.len() as u64,
                    head: *head,
                    superseded: 0,
                    epoch: Some(1),
                };
                (
                    axum::http::StatusCode::OK,
                    serde_json::to_string(&answer).expect("answer"),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!(
        "http://127.0.0.1:{port}{}",
        latchkey_shared::ledger::APPEND_PATH
    )
}

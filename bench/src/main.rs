//! `./dev bench [--quick]`: measures Latchkey against its ceilings and rewrites the results in
//! BENCHMARKS.md (the table and `bench/latency.png`).
//!
//! Every figure is a median over rounds run side by side with its ceiling, and every target is
//! a ratio against that ceiling, because the machine is shared and noisy. Nothing here is a
//! test: a missed target is reported, not failed.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a command-line benchmark driver: it prints, stops with a message when a step fails, and its figures are approximate"
)]

mod chart;
mod flood;
mod ledger;
mod load;
mod postgres;
mod seed;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use load::{Load, Run};
use serde_json::{Value, json};

/// What a run measures, and how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mode {
    pub(crate) quick: bool,
}

impl Mode {
    /// Keys in the origin database.
    fn keys(self) -> u64 {
        if self.quick { 100_000 } else { 1_000_000 }
    }
    /// Rounds of each load, interleaved with its ceiling.
    pub(crate) fn rounds(self) -> usize {
        if self.quick { 1 } else { 5 }
    }
    /// Length of one load run.
    pub(crate) fn duration(self) -> Duration {
        Duration::from_secs(if self.quick { 3 } else { 5 })
    }
    /// Revocations the propagation figures are taken over.
    fn revocations(self) -> usize {
        if self.quick { 40 } else { 200 }
    }
}

/// One line of the results table.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) figure: String,
    pub(crate) value: String,
    pub(crate) ceiling: String,
    pub(crate) ratio: Option<f64>,
    pub(crate) target: String,
    pub(crate) pass: Option<bool>,
}

/// Latency percentiles of one load, for the chart.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub(crate) panel: &'static str,
    pub(crate) label: String,
    /// (percentile, milliseconds)
    pub(crate) points: Vec<(f64, f64)>,
}

#[derive(Default)]
pub(crate) struct Report {
    rows: Vec<Row>,
    series: Vec<Series>,
    notes: Vec<String>,
}

impl Report {
    pub(crate) fn row(&mut self, row: Row) {
        eprintln!(
            "  {:<48} {:>16}  ceiling {:>14}  {}",
            row.figure,
            row.value,
            row.ceiling,
            row.pass.map_or("", |p| if p { "pass" } else { "MISS" })
        );
        self.rows.push(row);
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

pub(crate) fn step(name: &str) {
    eprintln!("\x1b[1m==> bench: {name}\x1b[0m");
}

/// Runs a command in the repository root; fails the bench if it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd.current_dir(root()).output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A child process in its own process group, ended (with its children) on drop.
pub(crate) struct Proc {
    child: Child,
}

impl Proc {
    /// Spawns `cmd` and waits for a stdout line containing `marker`; returns the line. Its
    /// stderr goes to `log`.
    pub(crate) fn spawn(cmd: Command, marker: &str, log: &Path) -> (Self, String) {
        Self::spawn_watching(cmd, marker, log, false)
    }

    /// As [`Proc::spawn`], for a program that logs to stderr: waits on stderr, stdout to `log`.
    pub(crate) fn spawn_stderr(cmd: Command, marker: &str, log: &Path) -> (Self, String) {
        Self::spawn_watching(cmd, marker, log, true)
    }

    fn spawn_watching(mut cmd: Command, marker: &str, log: &Path, stderr: bool) -> (Self, String) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(log).expect("log");
        cmd.current_dir(root())
            .stdin(Stdio::null())
            .process_group(0);
        if stderr {
            cmd.stdout(log).stderr(Stdio::piped());
        } else {
            cmd.stdout(Stdio::piped()).stderr(log);
        }
        let mut child = cmd.spawn().expect("spawn");
        let pipe: Box<dyn std::io::Read + Send> = if stderr {
            Box::new(child.stderr.take().expect("stderr"))
        } else {
            Box::new(child.stdout.take().expect("stdout"))
        };
        let mut lines = BufReader::new(pipe).lines();
        let line = loop {
            match lines.next() {
                Some(Ok(line)) if line.contains(marker) => break line,
                Some(Ok(_)) => {}
                _ => panic!("{cmd:?} ended before printing {marker:?}"),
            }
        };
        // Keep draining the pipe so the child never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        (Self { child }, line)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        for signal in ["-TERM", "-KILL"] {
            let _ = Command::new("kill")
                .args([signal, "--", &group])
                .stderr(Stdio::null())
                .status();
            std::thread::sleep(Duration::from_millis(300));
        }
        let _ = self.child.wait();
    }
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// A load against its ceiling, from runs made in pairs (the ceiling's run right before the
/// load's, in every round): the ratio is the median of the rounds' ratios, so a machine that
/// slows down between rounds moves both sides of a ratio, not one.
pub(crate) fn ratio_row(
    figure: &str,
    runs: &[Run],
    ceiling_runs: &[Run],
    unit: &str,
    at_least: f64,
) -> Row {
    let value = median(runs.iter().map(|r| r.rps).collect());
    let ceiling = median(ceiling_runs.iter().map(|r| r.rps).collect());
    let ratio = median(
        runs.iter()
            .zip(ceiling_runs)
            .map(|(run, ceiling)| run.rps / ceiling.rps)
            .collect(),
    );
    Row {
        figure: figure.into(),
        value: format!("{value:.0} {unit}"),
        ceiling: format!("{ceiling:.0} {unit}"),
        ratio: Some(ratio),
        target: format!("≥ {:.0}% of ceiling", at_least * 100.0),
        pass: Some(ratio >= at_least),
    }
}

/// The steps, in the order a full run takes them; `--only STEP` runs one of them. `ledger` is
/// the part of `edge` that measures the Worker with the change ledger (Miniflare only), for
/// working on it: a full run takes it inside `edge`.
const STEPS: [&str; 10] = [
    "micro",
    "memory",
    "wasm",
    "origin",
    "postgres",
    "flood",
    "edge",
    "ledger",
    "revocation",
    "secret_scanning",
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = Mode {
        quick: args.iter().any(|a| a == "--quick"),
    };
    // `--only STEP`: one step, for working on it. Its figures are printed, and BENCHMARKS.md is
    // left alone: a partial table would mix runs.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .map(|i| args.get(i + 1).cloned().unwrap_or_default());
    if let Some(step) = &only {
        assert!(
            STEPS.contains(&step.as_str()),
            "--only takes one of {STEPS:?}, not {step:?}"
        );
    }
    let wanted = |step: &str| only.as_deref().is_none_or(|o| o == step);
    let started = Instant::now();
    // Process ids repeat across boots: a run killed before its clean-up must not leave a
    // database for a later run with the same id to seed into.
    let work = std::env::temp_dir().join(format!("latchkey-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");
    let mut report = Report::default();

    if wanted("micro") {
        micro(&mut report, mode);
    }
    if wanted("memory") {
        memory(&mut report);
    }
    if wanted("wasm") {
        wasm(&mut report, mode, &work);
    }
    let ledger_only = only.as_deref() == Some("ledger");
    if wanted("origin") || wanted("postgres") || wanted("flood") || wanted("edge") || ledger_only {
        // Only the origin, postgres and flood steps need the full database; the edge step
        // needs one key.
        let keys = if wanted("origin") || wanted("postgres") || wanted("flood") {
            mode.keys()
        } else {
            1_000
        };
        let fixture = prepare(&mut report, keys, &work);
        if wanted("origin") {
            origin(&mut report, mode, &work, &fixture);
        }
        // Before the flood step's backlog: the copy is of the seeded keys.
        if wanted("postgres") {
            postgres::measure(&mut report, mode, &work, &fixture);
        }
        // After the origin step: it queues a backlog in the database.
        if wanted("flood") {
            flood::measure(&mut report, mode, &work, &fixture);
        }
        if wanted("edge") || ledger_only {
            edge(&mut report, mode, &work, &fixture, ledger_only);
        }
    }
    if wanted("revocation") {
        revocation(&mut report, mode);
    }
    if wanted("secret_scanning") {
        secret_scanning(&mut report);
    }

    if only.is_none() {
        let png = root().join("bench/latency.png");
        chart::draw(&report.series, &png);
        write_results(&report, mode, started.elapsed());
    }
    if only.is_some() {
        for note in &report.notes {
            eprintln!("  note: {note}");
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    let missed = report.rows.iter().filter(|r| r.pass == Some(false)).count();
    eprintln!(
        "bench: done in {:.0} s; {} targets held, {missed} missed; {}",
        started.elapsed().as_secs_f64(),
        report.rows.iter().filter(|r| r.pass == Some(true)).count(),
        if only.is_none() {
            "results in BENCHMARKS.md"
        } else {
            "BENCHMARKS.md left as it was (--only)"
        }
    );
}

/// 1. Criterion micro-benchmarks of the decision, natively.
fn micro(report: &mut Report, mode: Mode) {
    step("micro (criterion, native)");
    let mut cmd = latchkey_tests::cargo();
    cmd.args([
        "bench",
        "--locked",
        "-p",
        "latchkey-bench-wasm",
        "--bench",
        "decide",
        "--",
    ]);
    if mode.quick {
        cmd.args(["--warm-up-time", "1", "--measurement-time", "2"]);
    }
    run(&mut cmd);
    let ns = |name: &str| -> f64 {
        let path = target_dir().join(format!("criterion/{name}/new/estimates.json"));
        let text = std::fs::read_to_string(&path).expect("criterion estimates");
        let v: Value = serde_json::from_str(&text).expect("json");
        v["median"]["point_estimate"].as_f64().expect("median")
    };
    let anchor = ns("sha256_of_key");
    for (name, label) in [
        ("key_parse_and_checksum", "key parse + checksum"),
        ("key_hash", "SHA-256 of a key (KeyHash)"),
        ("scope_parse", "scope parse"),
        ("allows_in_20_scopes", "`allows` ×2 on a 20-scope set"),
    ] {
        let v = ns(name);
        report.row(Row {
            figure: format!("micro: {label}"),
            value: format!("{v:.0} ns/op"),
            ceiling: format!("{anchor:.0} ns (SHA-256)"),
            ratio: Some(v / anchor),
            target: String::new(),
            pass: None,
        });
    }
    let decision = ns("verify_decision");
    report.row(Row {
        figure: "micro: whole verify decision".into(),
        value: format!("{decision:.0} ns/op"),
        ceiling: format!("{anchor:.0} ns (SHA-256 of ~50 B)"),
        ratio: Some(decision / anchor),
        target: "≤ 3× one SHA-256".into(),
        pass: Some(decision / anchor <= 3.0),
    });
}

/// The isolate's hot-key memory per 10,000 keys, natively (`bench/src/bin/memory.rs`): heap
/// bytes held after `remember` of 10,000 records read from KV, and after `apply` of 10,000
/// ledger entries.
fn memory(report: &mut Report) {
    step("memory (the isolate's hot-key memory per 10,000 keys, natively)");
    run(latchkey_tests::cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "latchkey-bench",
        "--bin",
        "bench-memory",
    ]));
    let out = run(&mut Command::new(target_dir().join("release/bench-memory")));
    let v: Value = serde_json::from_str(out.trim()).expect("bench-memory JSON");
    let number = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let (keys, json_bytes, pointer) = (
        number("keys"),
        number("record_json_bytes"),
        number("pointer_bytes"),
    );
    for (what, key) in [
        ("hot cache, records read from KV (`remember`)", "hot_bytes"),
        ("ledger entries (`apply`)", "ledger_bytes"),
    ] {
        let bytes = number(key);
        report.row(Row {
            figure: format!("isolate memory per {keys:.0} keys: {what}, native"),
            value: format!("{:.2} MB ({:.0} B/key)", bytes / 1_000_000.0, bytes / keys),
            ceiling: format!("{:.2} MB of record JSON", json_bytes / 1_000_000.0),
            ratio: Some(bytes / json_bytes),
            target: format!(
                "information: {pointer:.0}-byte pointers here, 4 in wasm (smaller there)"
            ),
            pass: None,
        });
    }
}

/// 2. The same operations compiled to wasm under Node, beside native; the Worker's size and
///    compile/instantiate time.
fn wasm(report: &mut Report, mode: Mode, work: &Path) {
    step("wasm (the decision under Node beside native; the Worker's size and start-up)");
    run(latchkey_tests::cargo().args([
        "build",
        "--locked",
        "-p",
        "latchkey-bench-wasm",
        "--target",
        "wasm32-unknown-unknown",
        "--profile",
        "worker",
    ]));
    run(&mut Command::new(root().join("edge/build.sh")));
    let module = target_dir().join("wasm32-unknown-unknown/worker/latchkey_bench_wasm.wasm");
    let glue_dir = work.join("wasm");
    run(Command::new(wasm_bindgen())
        .args(["--target", "nodejs", "--out-dir"])
        .arg(&glue_dir)
        .arg(&module));
    let worker = root().join("edge/build/index_bg.wasm");
    let n: u32 = if mode.quick { 20_000 } else { 100_000 };
    let out = run(Command::new("node")
        .arg(root().join("bench/wasm.mjs"))
        .arg(glue_dir.join("latchkey_bench_wasm.js"))
        .arg(n.to_string())
        .arg(latchkey_bench_wasm::OPS.join(",")));
    let v: Value = serde_json::from_str(out.trim()).expect("wasm.mjs JSON");
    for (op, name) in latchkey_bench_wasm::OPS.iter().enumerate() {
        let op = u32::try_from(op).expect("op");
        let native = median(
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(latchkey_bench_wasm::run(op, n));
                    t.elapsed().as_nanos() as f64 / f64::from(n)
                })
                .collect(),
        );
        let wasm_ns = v["ops"][name].as_f64().expect("per-op ns");
        report.row(Row {
            figure: format!("wasm (Node): {name}"),
            value: format!("{wasm_ns:.0} ns/op"),
            ceiling: format!("{native:.0} ns native"),
            ratio: Some(wasm_ns / native),
            target: String::new(),
            pass: None,
        });
    }
    let raw = std::fs::metadata(&worker).expect("worker wasm").len();
    let gzip =
        run(Command::new("sh").args(["-c", &format!("gzip -9c {} | wc -c", worker.display())]))
            .trim()
            .parse::<u64>()
            .expect("gzip size");
    report.row(Row {
        figure: "Worker wasm after wasm-opt, raw (gzip)".into(),
        value: format!("{raw} B ({gzip} B)"),
        ceiling: "400,000 B".into(),
        ratio: Some(raw as f64 / 400_000.0),
        target: "< 400 KB raw".into(),
        pass: Some(raw < 400_000),
    });
}

/// What the origin and edge steps share: the seeded database, a valid key and its KV record,
/// and the constant-JSON ceiling server (origin's ceiling, and the gateway's upstream).
pub(crate) struct Fixture {
    pub(crate) db: PathBuf,
    pub(crate) keys: u64,
    pub(crate) secret: String,
    pub(crate) subject: String,
    pub(crate) record_name: String,
    pub(crate) record_json: String,
    pub(crate) _ceiling: Proc,
    pub(crate) ceiling_url: String,
}

/// Builds origin and the ceiling in release mode, seeds `keys` keys and starts the ceiling.
fn prepare(report: &mut Report, keys: u64, work: &Path) -> Fixture {
    step("prepare (release build, seed, the axum ceiling server)");
    run(latchkey_tests::cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "latchkey-origin",
        "-p",
        "latchkey-bench",
        "--bin",
        "origin",
        "--bin",
        "bench-ceiling",
    ]));
    let db = work.join("bench.db");
    let seeded = Instant::now();
    let seed = seed::seed(&db, keys);
    report.notes.push(format!(
        "Seeded {keys} keys ({} subjects) in {:.1} s.",
        seed::SUBJECTS,
        seeded.elapsed().as_secs_f64()
    ));
    let (ceiling, line) = Proc::spawn(
        Command::new(target_dir().join("release/bench-ceiling")),
        "listen=",
        &work.join("ceiling.log"),
    );
    Fixture {
        db,
        keys,
        secret: seed.secret,
        subject: seed.subject,
        record_name: seed.record_name,
        record_json: seed.record_json,
        _ceiling: ceiling,
        ceiling_url: format!("http://{}", line.trim_start_matches("listen=")),
    }
}

/// 3 and 6. Origin over HTTP on loopback, against the constant-JSON axum ceiling, over a
///    database of `mode.keys()` keys; origin's peak RSS.
fn origin(report: &mut Report, mode: Mode, work: &Path, fixture: &Fixture) {
    step("origin (load against the axum ceiling)");
    let token = BENCH_ADMIN_TOKEN;
    let mut origin_cmd = origin_command(fixture);
    origin_cmd.env("ADMIN_AUTH_FAILURES_PER_MINUTE", "1000000");
    // Origin logs to stderr; its "listening" line is what we wait for.
    let (origin, line) =
        Proc::spawn_stderr(origin_cmd, "origin listening", &work.join("origin.log"));
    let origin_url = format!(
        "http://{}",
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("listen="))
            .expect("listen=")
    );
    let ceiling_url = &fixture.ceiling_url;

    let auth = format!("Bearer {token}");
    let json = "application/json";
    let valid = Load::post(
        &format!("{origin_url}/v1/api_keys/verify"),
        &json!({ "secret": fixture.secret }).to_string(),
    )
    .header("authorization", &auth)
    .header("content-type", json);
    let garbage = Load::post(
        &format!("{origin_url}/v1/api_keys/verify"),
        &json!({ "secret": "sk_live_not-a-key" }).to_string(),
    )
    .header("authorization", &auth)
    .header("content-type", json);
    let create = Load::post(
        &format!("{origin_url}/v1/api_keys"),
        r#"{"name":"bench","subject":"partner-bench","scopes":["read:orders"]}"#,
    )
    .header("authorization", &auth)
    .header("content-type", json)
    .connections(64);
    let list = Load::get(&format!(
        "{origin_url}/v1/api_keys?subject={}&limit=10",
        fixture.subject
    ))
    .header("authorization", &auth);

    // The ceiling is sent the very same requests as the verify loads (it ignores them, but
    // hyper still reads them), each run beside the load it is compared with.
    let ceiling_load = valid.sent_to(ceiling_url);
    let garbage_ceiling_load = garbage.sent_to(ceiling_url);
    let mut runs: [Vec<Run>; 6] = Default::default();
    for _ in 0..mode.rounds() {
        for (i, load) in [
            &ceiling_load,
            &valid,
            &garbage_ceiling_load,
            &garbage,
            &create,
            &list,
        ]
        .iter()
        .enumerate()
        {
            runs[i].push(load.run(mode.duration()));
        }
    }
    let [
        ceiling_runs,
        valid_runs,
        garbage_ceiling_runs,
        garbage_runs,
        create_runs,
        list_runs,
    ] = runs;
    let ceiling_rps = median(ceiling_runs.iter().map(|r| r.rps).collect());
    let valid_rps = median(valid_runs.iter().map(|r| r.rps).collect());
    let garbage_rps = median(garbage_runs.iter().map(|r| r.rps).collect());
    let create_rps = median(create_runs.iter().map(|r| r.rps).collect());
    let list_rps = median(list_runs.iter().map(|r| r.rps).collect());
    // Latency at half of each one's own peak rate (a loaded but unsaturated service).
    let half = |load: &Load, rps: f64| load.clone().rate(rps / 2.0).run(mode.duration());
    let valid_half = half(&valid, valid_rps);
    let list_half = half(&list, list_rps);
    let ceiling_half = half(&ceiling_load, ceiling_rps);
    let garbage_half = half(&garbage, garbage_rps);
    let rss_kb = peak_rss_kb(origin.pid());

    report.row(ratio_row(
        "origin verify, valid key",
        &valid_runs,
        &ceiling_runs,
        "req/s",
        0.5,
    ));
    report.row(Row {
        figure: "origin verify p99 at half its peak rate".into(),
        value: format!("{:.2} ms", valid_half.p99_ms),
        ceiling: format!("{:.2} ms", ceiling_half.p99_ms),
        ratio: Some(valid_half.p99_ms / ceiling_half.p99_ms),
        target: "< 5 ms".into(),
        pass: Some(valid_half.p99_ms < 5.0),
    });
    report.row(ratio_row(
        "origin verify, garbage key",
        &garbage_runs,
        &garbage_ceiling_runs,
        "req/s",
        0.8,
    ));
    report.row(Row {
        figure: "origin create, durable (64 concurrent clients)".into(),
        value: format!("{create_rps:.0} keys/s"),
        ceiling: format!("{ceiling_rps:.0} req/s"),
        ratio: Some(create_rps / ceiling_rps),
        target: "≥ 2,000 keys/s".into(),
        pass: Some(create_rps >= 2000.0),
    });
    report.row(Row {
        figure: format!(
            "origin list, one page by subject, {} keys, p99 at half peak",
            fixture.keys
        ),
        value: format!("{:.2} ms ({list_rps:.0} req/s peak)", list_half.p99_ms),
        ceiling: format!("{:.2} ms", ceiling_half.p99_ms),
        ratio: Some(list_half.p99_ms / ceiling_half.p99_ms),
        target: "p99 < 10 ms".into(),
        pass: Some(list_half.p99_ms < 10.0),
    });
    report.row(Row {
        figure: format!("origin peak RSS, {} keys, after the loads", fixture.keys),
        value: format!("{:.0} MB", rss_kb as f64 / 1024.0),
        ceiling: String::new(),
        ratio: None,
        target: "< 250 MB".into(),
        pass: Some(rss_kb < 250 * 1024),
    });
    for (label, run) in [
        ("ceiling (constant JSON)", &ceiling_half),
        ("verify, valid key", &valid_half),
        ("verify, garbage key", &garbage_half),
        ("list by subject", &list_half),
    ] {
        report.series.push(Series {
            panel: "origin (half of peak rate)",
            label: label.into(),
            points: run.percentiles.clone(),
        });
    }
    drop(origin);
}

/// The admin token origin runs with in the benchmarks.
pub(crate) const BENCH_ADMIN_TOKEN: &str = "bench-admin-token-0000000000000000000000";

/// `origin serve` (release) over the fixture's database on a free port, with the default log
/// level (requests themselves are logged at debug) and nothing else of the environment.
pub(crate) fn origin_command(fixture: &Fixture) -> Command {
    let mut cmd = Command::new(target_dir().join("release/origin"));
    cmd.arg("serve")
        .env_clear()
        .env("DATABASE_URL", format!("sqlite://{}", fixture.db.display()))
        .env("ADMIN_TOKEN", BENCH_ADMIN_TOKEN)
        .env("AUDIT_CHAIN_KEY", seed::AUDIT_CHAIN_KEY)
        .env("ORIGIN_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info");
    cmd
}

fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// 4. The edge: our Worker, two minimal Rust Workers (one KV get; a constant body) and the
///    gateway's floor (one KV get, one fetch), served by workerd directly through Miniflare,
///    through `wrangler dev`'s proxy, and through wrangler's dev server with DevTools off.
///    With `ledger_only`, only the rows of the Worker with the ledger (under Miniflare).
fn edge(report: &mut Report, mode: Mode, work: &Path, fixture: &Fixture, ledger_only: bool) {
    step(
        "edge (Worker and ceiling Workers under Miniflare, wrangler dev, and wrangler without DevTools)",
    );
    // Built here too (a no-op when up to date): `--only edge` and `--only ledger` skip the wasm
    // step, and must not measure a missing or stale Worker.
    run(&mut Command::new(root().join("edge/build.sh")));
    run(&mut Command::new(root().join("bench/workers/build.sh")));
    let config = json!({
        "record_name": fixture.record_name,
        "record_json": fixture.record_json,
        "upstream": fixture.ceiling_url,
        "root": root(),
        "ledger_secret": ledger::LEDGER_SECRET,
    });
    let config_path = work.join("edge.json");
    std::fs::write(&config_path, config.to_string()).expect("edge config");
    let mut node = Command::new("node");
    node.arg(root().join("bench/edge.mjs")).arg(&config_path);
    let (miniflare, line) = Proc::spawn(node, "ports=", &work.join("miniflare.log"));
    let ports: Value = serde_json::from_str(line.trim_start_matches("ports=")).expect("ports JSON");
    let at = |name: &str| format!("http://127.0.0.1:{}", ports[name]);
    if ledger_only {
        ledger::measure(report, mode, &ledger_under_test(&at), fixture);
        return;
    }
    let cold = &ports["cold"];
    let ms = |w: &str, k: &str| cold[w][k].as_f64().unwrap_or(f64::NAN);
    report.row(Row {
        figure: "Worker cold start under workerd: start-up + first request".into(),
        value: format!(
            "{:.0} + {:.1} ms",
            ms("edge", "ready_ms"),
            ms("edge", "first_request_ms")
        ),
        ceiling: format!(
            "{:.0} + {:.1} ms (constant Worker)",
            ms("constant", "ready_ms"),
            ms("constant", "first_request_ms")
        ),
        ratio: Some(
            (ms("edge", "ready_ms") + ms("edge", "first_request_ms"))
                / (ms("constant", "ready_ms") + ms("constant", "first_request_ms")),
        ),
        target: String::new(),
        pass: None,
    });
    measure_edge(
        report,
        mode,
        &EdgeUnderTest {
            runner: "Miniflare (workerd direct)",
            edge: &at("edge"),
            kv_get: &at("kv_get"),
            kv_fetch: &at("kv_fetch"),
            constant: &at("constant"),
            shimmed: Some(Shimmed {
                edge: &at("edge_shim"),
                kv_fetch: &at("kv_fetch_shim"),
            }),
        },
        &fixture.secret,
    );
    // With the ledger on, in the same runner: hot keys from the isolate's memory.
    ledger::measure(report, mode, &ledger_under_test(&at), fixture);
    drop(miniflare);

    // The same four under `wrangler dev`, whose proxy caps throughput here; then under its dev
    // server with DevTools off, which only the gateway and its floor notice. The quick mode
    // leaves them out: they measure wrangler's proxy, not the Worker.
    if mode.quick {
        report.notes.push(
            "Quick mode: the edge under `wrangler dev` (its proxy and its dev server) is left out."
                .into(),
        );
        return;
    }
    for runner in [WranglerDev::Command, WranglerDev::WithoutDevTools] {
        let (servers, bases) = runner.serve_all(work, fixture);
        measure_edge(
            report,
            mode,
            &EdgeUnderTest {
                runner: runner.label(),
                edge: &bases[0],
                kv_get: &bases[1],
                kv_fetch: &bases[2],
                constant: &bases[3],
                shimmed: None,
            },
            &fixture.secret,
        );
        drop(servers);
    }
}

/// The Workers `bench/edge.mjs` serves for the ledger rows, by the name it gives their ports.
fn ledger_under_test(at: &impl Fn(&str) -> String) -> ledger::LedgerUnderTest {
    ledger::LedgerUnderTest {
        edge: at("edge_ledger"),
        debug: at("edge_ledger_debug"),
        constant: at("constant"),
        fetch_only: at("fetch_only"),
    }
}

/// Two ways of serving a Worker with wrangler's local dev server.
#[derive(Clone, Copy)]
enum WranglerDev {
    /// The `wrangler dev` command, as `./dev run` uses it.
    Command,
    /// Wrangler's dev server with its inspector off (`bench/wrangler-dev.mjs`): `wrangler dev`
    /// always enables DevTools network events, which cost every `fetch` a Worker makes.
    WithoutDevTools,
}

impl WranglerDev {
    fn label(self) -> &'static str {
        match self {
            Self::Command => "wrangler dev (through its proxy)",
            Self::WithoutDevTools => "wrangler's dev server, DevTools off",
        }
    }

    /// Serves our Worker, then the one-KV-get, floor and constant Workers, each with the key's
    /// record in its local KV. Returns the servers (stopped when dropped) and their base URLs.
    fn serve_all(self, work: &Path, fixture: &Fixture) -> (Vec<Proc>, Vec<String>) {
        let mut servers = Vec::new();
        let mut bases = Vec::new();
        for (config, vars) in [
            (
                "wrangler.toml",
                vec![
                    ("UPSTREAM_URL", fixture.ceiling_url.clone()),
                    (
                        "UPSTREAM_SIGNING_SECRET",
                        "bench-upstream-secret-000000000000".into(),
                    ),
                    ("ORIGIN_USAGE_URL", String::new()),
                ],
            ),
            (
                "bench/workers/kv-get/wrangler.toml",
                vec![("RECORD_NAME", fixture.record_name.clone())],
            ),
            (
                "bench/workers/kv-fetch/wrangler.toml",
                vec![
                    ("RECORD_NAME", fixture.record_name.clone()),
                    ("UPSTREAM_URL", fixture.ceiling_url.clone()),
                ],
            ),
            ("bench/workers/constant/wrangler.toml", vec![]),
        ] {
            let port = free_port();
            let state = work.join(format!("wrangler-{port}"));
            let vars = vars.iter().map(|(name, value)| format!("{name}:{value}"));
            let mut cmd = match self {
                Self::Command => {
                    let mut cmd = Command::new(root().join("node_modules/.bin/wrangler"));
                    cmd.args(["dev", "--config", config, "--ip", "127.0.0.1"])
                        .args(["--port", &port.to_string()])
                        .args(["--inspector-port", &free_port().to_string()])
                        .arg("--persist-to")
                        .arg(&state);
                    for var in vars {
                        cmd.args(["--var", &var]);
                    }
                    cmd
                }
                Self::WithoutDevTools => {
                    let mut cmd = Command::new("node");
                    cmd.arg(root().join("bench/wrangler-dev.mjs"))
                        .args([config, &port.to_string()])
                        .arg(&state)
                        .args(vars);
                    cmd
                }
            };
            cmd.env("WRANGLER_SEND_METRICS", "false").env("CI", "1");
            let (server, _) =
                Proc::spawn(cmd, "Ready on", &work.join(format!("wrangler-{port}.log")));
            let base = format!("http://127.0.0.1:{port}");
            // Put the record into this server's local KV through its KV REST API.
            let url = format!(
                "{base}/cdn-cgi/explorer/api/storage/kv/namespaces/00000000000000000000000000000000/values/{}",
                fixture.record_name
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            while !run(Command::new("curl").args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "PUT",
                "--data-binary",
                &fixture.record_json,
                &url,
            ]))
            .starts_with('2')
            {
                assert!(
                    Instant::now() < deadline,
                    "wrangler's KV did not accept the record"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            servers.push(server);
            bases.push(base);
        }
        (servers, bases)
    }
}

/// The edge's URLs under one runner: our Worker and the minimal Workers it is compared with.
struct EdgeUnderTest<'a> {
    runner: &'static str,
    edge: &'a str,
    /// One KV get of the record, returned as is: the ceiling for valid-key traffic.
    kv_get: &'a str,
    /// One KV get, then one fetch of the upstream: the floor under the gateway's valid traffic.
    kv_fetch: &'a str,
    /// A constant body: the ceiling for garbage traffic.
    constant: &'a str,
    /// Under Miniflare: our Worker and the floor again, with Miniflare's default outbound shim
    /// (a JS Worker that copies every fetched request's headers and fetches again; see
    /// `bench/edge.mjs`), to show what that local-only layer costs the gateway.
    shimmed: Option<Shimmed<'a>>,
}

/// Our Worker and the gateway floor with Miniflare's outbound shim on.
struct Shimmed<'a> {
    edge: &'a str,
    kv_fetch: &'a str,
}

fn measure_edge(report: &mut Report, mode: Mode, at: &EdgeUnderTest<'_>, secret: &str) {
    let EdgeUnderTest {
        runner,
        edge,
        kv_get,
        kv_fetch,
        constant,
        ref shimmed,
    } = *at;
    let json = "application/json";
    let verify = Load::post(
        &format!("{edge}/v1/api_keys/verify"),
        &json!({ "key": secret }).to_string(),
    )
    .header("content-type", json);
    let gateway = Load::get(&format!("{edge}/orders/42"))
        .header("authorization", &format!("Bearer {secret}"));
    let garbage = Load::post(
        &format!("{edge}/v1/api_keys/verify"),
        r#"{"key":"sk_live_not-a-key"}"#,
    )
    .header("content-type", json);
    // Garbage at the gateway: the key is in a header, so no body is read (401).
    let gateway_garbage =
        Load::get(&format!("{edge}/orders/42")).header("authorization", "Bearer sk_live_not-a-key");
    // Each load is run beside its ceiling, and the ceiling is sent the very same requests
    // (method, path, headers, body): it ignores them, but the runtime still receives them.
    let pairs = [
        ("edge verify, valid key, no ledger", &verify, kv_get, 0.85),
        ("edge gateway, valid key, no ledger", &gateway, kv_get, 0.70),
        ("edge verify, garbage key", &garbage, constant, 0.90),
        (
            "edge gateway, garbage key (401)",
            &gateway_garbage,
            constant,
            0.90,
        ),
    ];
    // In every round: each ceiling right before its load, and the floor right after the
    // gateway. `at[i]` is where pair i's ceiling run sits; its load's run is next.
    let mut loads: Vec<Load> = Vec::new();
    let mut at = Vec::new();
    for (_, load, ceiling, _) in &pairs {
        at.push(loads.len());
        loads.push(load.sent_to(ceiling));
        loads.push((*load).clone());
        if std::ptr::eq(*load, &gateway) {
            loads.push(gateway.sent_to(kv_fetch));
            if let Some(shimmed) = shimmed {
                loads.push(gateway.sent_to(shimmed.edge));
                loads.push(gateway.sent_to(shimmed.kv_fetch));
            }
        }
    }
    let (gateway_at, floor_at) = (at[1] + 1, at[1] + 2);
    // Warm every isolate first.
    for load in &loads {
        load.run(Duration::from_secs(1));
    }
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); loads.len()];
    for _ in 0..mode.rounds() {
        for (i, load) in loads.iter().enumerate() {
            runs[i].push(load.run(mode.duration()));
        }
    }
    for ((figure, _, ceiling, at_least), &i) in pairs.iter().zip(&at) {
        let mut row = ratio_row(
            &format!("{figure} — {runner}"),
            &runs[i + 1],
            &runs[i],
            "req/s",
            *at_least,
        );
        let what = if *ceiling == kv_get {
            "one KV get"
        } else {
            "constant body"
        };
        row.ceiling = format!("{} ({what})", row.ceiling);
        report.row(row);
    }
    let mut floor = ratio_row(
        &format!("edge gateway floor: one KV get + one upstream fetch, minimal Worker — {runner}"),
        &runs[floor_at],
        &runs[at[1]],
        "req/s",
        0.0,
    );
    let gateway_to_floor = median(
        runs[gateway_at]
            .iter()
            .zip(&runs[floor_at])
            .map(|(gateway, floor)| gateway.rps / floor.rps)
            .collect(),
    );
    floor.ceiling = format!("{} (one KV get)", floor.ceiling);
    floor.target = format!(
        "our gateway: {:.0}% of this floor",
        100.0 * gateway_to_floor
    );
    floor.pass = None;
    report.row(floor);
    if shimmed.is_some() {
        for (figure, i) in [
            (
                "edge gateway, valid key — Miniflare with its outbound shim (its default)",
                floor_at + 1,
            ),
            (
                "edge gateway floor — Miniflare with its outbound shim (its default)",
                floor_at + 2,
            ),
        ] {
            let mut row = ratio_row(figure, &runs[i], &runs[at[1]], "req/s", 0.0);
            row.ceiling = format!("{} (one KV get)", row.ceiling);
            row.target = "information: a local-only layer (bench/edge.mjs)".into();
            row.pass = None;
            report.row(row);
        }
    }
    if runner.starts_with("Miniflare") {
        for (label, i) in [
            ("ceiling: one KV get (verify requests)", at[0]),
            ("verify, valid key", at[0] + 1),
            ("gateway, valid key", gateway_at),
            ("floor: KV get + upstream fetch", floor_at),
            ("ceiling: constant body (verify requests)", at[2]),
            ("verify, garbage key", at[2] + 1),
            ("gateway, garbage key", at[3] + 1),
        ] {
            let run = runs[i].last().expect("a run");
            report.series.push(Series {
                panel: "edge under Miniflare (peak rate)",
                label: label.into(),
                points: run.percentiles.clone(),
            });
        }
    }
}

/// The wasm-bindgen CLI `./dev setup` installs (the version in Cargo.lock).
fn wasm_bindgen() -> PathBuf {
    std::env::var_os("WASM_BINDGEN_BIN").map_or_else(
        || {
            std::env::var_os("HOME").map_or_else(
                || PathBuf::from("wasm-bindgen"),
                |h| PathBuf::from(h).join(".cargo/bin/wasm-bindgen"),
            )
        },
        PathBuf::from,
    )
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// 5. Revocation propagation over 200 revocations, through the end-to-end test; then, if the
///    ledger's end-to-end test is there (`tests/tests/ledger.rs`), its revocations with stale KV.
fn revocation(report: &mut Report, mode: Mode) {
    let n = mode.revocations();
    step(&format!(
        "revocation propagation ({n} revocations, origin -> KV -> the Worker under wrangler dev)"
    ));
    let text = measured_test("edge", Some("edge_follows_origin_changes"), n);
    let line = text
        .lines()
        .find(|l| l.contains("MEASURED revocation propagation"))
        .unwrap_or_else(|| panic!("no revocation figure in:\n{text}"));
    let [p50, p99, max] = percentiles(line).map(|v| v.unwrap_or(f64::NAN));
    report.row(Row {
        figure: format!("revocation propagation, local, {n} revocations"),
        value: format!("p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms"),
        ceiling: String::new(),
        ratio: None,
        // Since the ledger, the edge follows a revocation through its one-second poll, not KV
        // (whose local copy is immediate): the ledger's bound is the target.
        target: "p99 < 1.5 s (ledger poll)".into(),
        pass: Some(p99 < 1500.0),
    });

    if !root().join("tests/tests/ledger.rs").exists() {
        report.notes.push(
            "Revocation with stale KV: tests/tests/ledger.rs is not there yet; not measured."
                .into(),
        );
        return;
    }
    step("revocation with stale KV (the ledger's end-to-end test)");
    // Quick: only the test that measures revocations (the others of the file check faults and
    // keys missing from KV, and take minutes).
    let text = measured_test(
        "ledger",
        mode.quick
            .then_some("hot_keys_are_answered_from_memory_and_stale_kv_never_wins"),
        n,
    );
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("MEASURED ledger revocation"))
        .collect();
    if lines.is_empty() {
        report.notes.push(
            "Revocation with stale KV: the ledger's end-to-end test printed no `MEASURED ledger \
             revocation` line (did it fail?); not measured."
                .into(),
        );
    }
    for line in lines {
        let what = line
            .split("MEASURED ")
            .nth(1)
            .and_then(|rest| rest.split(':').next())
            .unwrap_or("ledger revocation")
            .trim();
        let [p50, p99, max] = percentiles(line);
        let ms = |v: Option<f64>| v.map_or_else(|| "?".into(), |v| format!("{v:.0} ms"));
        report.row(Row {
            figure: format!("{what}, local, default poll"),
            value: format!("p50 {}, p99 {}, max {}", ms(p50), ms(p99), ms(max)),
            ceiling: String::new(),
            ratio: None,
            target: "p99 < 1.5 s".into(),
            pass: p99.map(|p99| p99 < 1500.0),
        });
    }
}

/// 8. A GitHub secret scanning alert of 5,000 tokens, 200 of them live keys, signed as GitHub
///    signs it, against origin (the test build, as `./dev test` runs it): the first time (200
///    revocations) and GitHub's retry of it (nothing to change, the median of 5), read from the
///    end-to-end test's `MEASURED` line.
fn secret_scanning(report: &mut Report) {
    step("GitHub secret scanning: an alert of 5,000 tokens (the end-to-end test)");
    let text = measured_test("secret_scanning", Some("a_signed_alert_revokes"), 0);
    let line = text
        .lines()
        .find(|l| l.contains("MEASURED secret scanning"))
        .unwrap_or_else(|| panic!("no secret scanning figure in:\n{text}"));
    let ms_after = |marker: &str| -> f64 {
        line.split(marker)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let (first, retry) = (ms_after("answered in "), ms_after("median "));
    // GitHub publishes no timeout for partner endpoints; a second is a tenth of the shortest
    // webhook timeouts in common use (10 s), so "well within" whatever GitHub's is.
    report.row(Row {
        figure: "GitHub alert, 5,000 tokens (200 ours), debug build: first / retry".into(),
        value: format!("{first:.0} ms / {retry:.0} ms"),
        ceiling: String::new(),
        ratio: None,
        target: "< 1 s".into(),
        pass: Some(first < 1000.0 && retry < 1000.0),
    });
}

/// Runs one end-to-end test binary (optionally one test of it) with its output shown, and
/// returns what it printed (stderr, then stdout), whether or not it passed.
/// `revocations` sets how many times the test repeats its timed changes
/// (`LATCHKEY_REVOCATIONS`). The test build is `./dev test`'s, so after it nothing is rebuilt.
fn measured_test(binary: &str, test: Option<&str>, revocations: usize) -> String {
    let mut cmd = latchkey_tests::cargo();
    cmd.args(["test", "--locked", "-p", "latchkey-tests", "--test", binary]);
    if let Some(test) = test {
        cmd.arg(test);
    }
    let out = cmd
        .args(["--", "--nocapture"])
        .env("LATCHKEY_REVOCATIONS", revocations.max(1).to_string())
        .current_dir(root())
        .output()
        .expect("cargo test");
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

/// p50, p99 and max from a `MEASURED` line, in milliseconds, read tolerantly: `p99 812 ms`,
/// `p99=812ms`, `p99: 0.81 s`, `p99 812.5` (milliseconds when no unit) all read as the same
/// kind of figure; a figure that is not there is `None`.
fn percentiles(line: &str) -> [Option<f64>; 3] {
    let body = line.split_once("MEASURED").map_or(line, |(_, rest)| rest);
    let tokens: Vec<String> = body
        .replace(['=', ',', ';', '(', ')'], " ")
        .replace(": ", " ")
        .split_whitespace()
        .map(|t| t.trim_end_matches(':').to_ascii_lowercase())
        .collect();
    let value = |name: &str| -> Option<f64> {
        let i = tokens.iter().position(|t| t == name)?;
        let token = tokens.get(i + 1)?;
        let digits = token.trim_end_matches(|c: char| c.is_ascii_alphabetic() || c == 'µ');
        let number: f64 = digits.parse().ok()?;
        let unit = match &token[digits.len()..] {
            "" => tokens.get(i + 2).map_or("ms", String::as_str),
            unit => unit,
        };
        Some(match unit {
            "s" | "sec" | "secs" | "seconds" => number * 1000.0,
            "us" | "µs" => number / 1000.0,
            _ => number,
        })
    };
    [value("p50"), value("p99"), value("max")]
}

/// Rewrites the results section of BENCHMARKS.md (between its markers).
fn write_results(report: &Report, mode: Mode, took: Duration) {
    let path = root().join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).expect("BENCHMARKS.md");
    let (start, end) = ("<!-- results:start -->", "<!-- results:end -->");
    let (Some(a), Some(b)) = (text.find(start), text.find(end)) else {
        panic!("BENCHMARKS.md lacks the {start} / {end} markers");
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let date = run(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
    let mut out = String::new();
    let _ = writeln!(out, "{start}");
    let _ = writeln!(
        out,
        "\nRun: {} ({} mode, {:.0} s), {cores} cores ({cpu}), {} keys at origin.\n",
        date.trim(),
        if mode.quick { "quick" } else { "full" },
        took.as_secs_f64(),
        mode.keys()
    );
    let _ = writeln!(out, "| figure | value | ceiling | ratio | target | |");
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for r in &report.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            r.figure,
            r.value,
            r.ceiling,
            r.ratio.map_or(String::new(), |x| format!("{x:.2}")),
            r.target,
            r.pass.map_or("", |p| if p { "pass" } else { "**miss**" })
        );
    }
    for note in &report.notes {
        let _ = writeln!(out, "\n{note}");
    }
    let _ = writeln!(out, "\n![latency percentiles](bench/latency.png)\n");
    let _ = write!(out, "{end}");
    let rewritten = format!("{}{}{}", &text[..a], out, &text[b + end.len()..]);
    std::fs::write(&path, rewritten).expect("write BENCHMARKS.md");
}

#[cfg(test)]
mod tests {
    use super::percentiles;

    #[test]
    fn measured_lines_are_read_tolerantly() {
        let cases = [
            (
                "MEASURED revocation propagation: p50 11 ms, p99 16 ms, max 19 ms",
                [Some(11.0), Some(16.0), Some(19.0)],
            ),
            (
                "MEASURED ledger revocation with stale KV: p50=420ms p99=0.9s max=1.2 s",
                [Some(420.0), Some(900.0), Some(1200.0)],
            ),
            (
                "MEASURED ledger revocation with stale KV (50 keys): p50: 380.5, p99: 1100 ms",
                [Some(380.5), Some(1100.0), None],
            ),
            (
                "MEASURED ledger revocation with stale KV: none",
                [None, None, None],
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(percentiles(line), expected, "{line}");
        }
    }
}

//! 3b. Origin on PostgreSQL beside origin on SQLite: the same database of keys (copied by
//! `migrate-store`'s own code), one and then two replicas, against the same axum ceiling.
//! Verify, durable create, a page by subject and a page by a metadata field, plus the
//! metadata page on SQLite (which has no index for it) for comparison.
//!
//! The server is the one `./dev bench` starts (`TEST_DATABASE_URL`): a throwaway cluster with
//! Debian's defaults (fsync on, synchronous_commit on), on the same machine as the load.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::json;
use sqlx::Connection;

use crate::load::{Load, Run};
use crate::{
    BENCH_ADMIN_TOKEN, Fixture, Mode, Proc, Report, Row, median, origin_command, ratio_row, step,
};

/// Starts `origin serve` (release) on `database`; its base URL.
fn serve(fixture: &Fixture, database: &str, work: &Path, name: &str) -> (Proc, String) {
    let mut cmd: Command = origin_command(fixture);
    cmd.env("DATABASE_URL", database)
        .env("ADMIN_AUTH_FAILURES_PER_MINUTE", "1000000")
        .env(
            "AUDIT_CHECKPOINT_FILE",
            work.join(format!("{name}.checkpoints")),
        );
    let (proc, line) =
        Proc::spawn_stderr(cmd, "origin listening", &work.join(format!("{name}.log")));
    let url = format!(
        "http://{}",
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("listen="))
            .expect("listen=")
    );
    (proc, url)
}

/// A new database on the server; its URL.
async fn fresh_database(server: &str) -> String {
    let mut admin = sqlx::PgConnection::connect(server)
        .await
        .expect("connect to TEST_DATABASE_URL");
    let name = format!("latchkey_bench_{}", std::process::id());
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
        .execute(&mut admin)
        .await
        .expect("drop");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create database");
    let _ = admin.close().await;
    let (base, _) = server.rsplit_once('/').expect("a database in the URL");
    format!("{base}/{name}")
}

/// The loads of one origin (or one replica of several).
struct Loads {
    verify: Load,
    create: Load,
    by_subject: Load,
    by_metadata: Load,
}

fn loads(url: &str, fixture: &Fixture) -> Loads {
    let auth = format!("Bearer {BENCH_ADMIN_TOKEN}");
    let json = "application/json";
    Loads {
        verify: Load::post(
            &format!("{url}/v1/api_keys/verify"),
            &json!({ "secret": fixture.secret }).to_string(),
        )
        .header("authorization", &auth)
        .header("content-type", json),
        create: Load::post(
            &format!("{url}/v1/api_keys"),
            r#"{"name":"bench","subject":"partner-bench","scopes":["read:orders"]}"#,
        )
        .header("authorization", &auth)
        .header("content-type", json)
        .connections(64),
        by_subject: Load::get(&format!(
            "{url}/v1/api_keys?subject={}&limit=10",
            fixture.subject
        ))
        .header("authorization", &auth),
        by_metadata: Load::get(&format!(
            "{url}/v1/api_keys?claims[tier]={}&limit=10",
            crate::seed::RARE_TIER
        ))
        .header("authorization", &auth),
    }
}

/// Runs `load` against each replica at once (each with its share of connections); the summed
/// rate and the slowest p99.
fn together(loads: &[Load], mode: Mode) -> Run {
    let runs: Vec<Run> = std::thread::scope(|scope| {
        let handles: Vec<_> = loads
            .iter()
            .map(|load| scope.spawn(move || load.run(mode.duration())))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("load"))
            .collect()
    });
    Run {
        rps: runs.iter().map(|r| r.rps).sum(),
        p99_ms: runs.iter().map(|r| r.p99_ms).fold(0.0, f64::max),
        percentiles: runs
            .first()
            .map(|r| r.percentiles.clone())
            .unwrap_or_default(),
    }
}

pub(crate) fn measure(report: &mut Report, mode: Mode, work: &Path, fixture: &Fixture) {
    step("postgres (origin on PostgreSQL: one and two replicas; SQLite beside it)");
    let Ok(server) = std::env::var("TEST_DATABASE_URL") else {
        report.notes.push(
            "PostgreSQL rows skipped: no TEST_DATABASE_URL (`./dev bench` starts a server)".into(),
        );
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let database = runtime.block_on(fresh_database(&server));
    let copying = Instant::now();
    let copied = runtime
        .block_on(latchkey_origin::store::migrate::sqlite_to_postgres(
            &format!("sqlite://{}", fixture.db.display()),
            &database,
        ))
        .expect("copy the seeded database");
    report.notes.push(format!(
        "PostgreSQL: {} keys copied from the seeded SQLite file by `migrate-store`'s code in {:.1} s.",
        copied.keys,
        copying.elapsed().as_secs_f64()
    ));

    // SQLite's metadata page, for comparison (no index serves it there).
    let (sqlite, sqlite_url) = serve(
        fixture,
        &format!("sqlite://{}", fixture.db.display()),
        work,
        "sqlite-metadata",
    );
    let sqlite_metadata = loads(&sqlite_url, fixture).by_metadata;
    let sqlite_peak = sqlite_metadata.run(mode.duration());
    let sqlite_half = sqlite_metadata
        .clone()
        .rate((sqlite_peak.rps / 2.0).max(1.0))
        .run(mode.duration());
    drop(sqlite);

    let (first, first_url) = serve(fixture, &database, work, "postgres-1");
    let one = loads(&first_url, fixture);
    let ceiling = one.verify.sent_to(&fixture.ceiling_url);
    let mut runs: [Vec<Run>; 5] = Default::default();
    for _ in 0..mode.rounds() {
        for (i, load) in [
            &ceiling,
            &one.verify,
            &one.create,
            &one.by_subject,
            &one.by_metadata,
        ]
        .iter()
        .enumerate()
        {
            runs[i].push(load.run(mode.duration()));
        }
    }
    let [
        ceiling_runs,
        verify_runs,
        create_runs,
        subject_runs,
        metadata_runs,
    ] = runs;
    let rate = |runs: &[Run]| median(runs.iter().map(|r| r.rps).collect());
    let ceiling_rps = rate(&ceiling_runs);
    let half = |load: &Load, runs: &[Run]| load.clone().rate(rate(runs) / 2.0).run(mode.duration());
    let subject_half = half(&one.by_subject, &subject_runs);
    let metadata_half = half(&one.by_metadata, &metadata_runs);

    let (second, second_url) = serve(fixture, &database, work, "postgres-2");
    let two = loads(&second_url, fixture);
    let halved = |load: &Load| load.clone().connections(8);
    let mut two_verify = Vec::new();
    let mut two_create = Vec::new();
    for _ in 0..mode.rounds() {
        two_verify.push(together(&[halved(&one.verify), halved(&two.verify)], mode));
        two_create.push(together(
            &[
                one.create.clone().connections(32),
                two.create.clone().connections(32),
            ],
            mode,
        ));
    }
    drop(second);
    drop(first);

    report.row(ratio_row(
        "origin verify, valid key (PostgreSQL)",
        &verify_runs,
        &ceiling_runs,
        "req/s",
        0.5,
    ));
    report.row(ratio_row(
        "origin verify, two replicas on PostgreSQL",
        &two_verify,
        &ceiling_runs,
        "req/s",
        0.5,
    ));
    for (figure, runs) in [
        (
            "origin create, durable (PostgreSQL, 64 clients)",
            &create_runs,
        ),
        (
            "origin create, durable, two replicas on PostgreSQL",
            &two_create,
        ),
    ] {
        let rps = rate(runs);
        report.row(Row {
            figure: figure.into(),
            value: format!("{rps:.0} keys/s"),
            ceiling: format!("{ceiling_rps:.0} req/s"),
            ratio: Some(rps / ceiling_rps),
            target: "≥ 2,000 keys/s".into(),
            pass: Some(rps >= 2000.0),
        });
    }
    // PostgreSQL holds what was copied (the seeded keys, and those the SQLite step's create
    // load added); the SQLite row reads the same file.
    let keys = copied.keys;
    for (figure, run, peak) in [
        (
            "by subject (PostgreSQL)",
            &subject_half,
            rate(&subject_runs),
        ),
        (
            "by a metadata field (PostgreSQL)",
            &metadata_half,
            rate(&metadata_runs),
        ),
        (
            "by a metadata field (SQLite, no index)",
            &sqlite_half,
            sqlite_peak.rps,
        ),
    ] {
        report.row(Row {
            figure: format!("origin list, one page {figure}, {keys} keys, p99 at half peak"),
            value: format!("{:.2} ms ({peak:.0} req/s peak)", run.p99_ms),
            ceiling: String::new(),
            ratio: None,
            target: "p99 < 10 ms".into(),
            pass: Some(run.p99_ms < 10.0),
        });
    }
}

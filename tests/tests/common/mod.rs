//! `TestApp`: the real `origin` binary, on a port of its own choosing, over a real SQLite file in
//! a temporary folder (or, with `LATCHKEY_TEST_BACKEND=postgres`, a database of its own on the
//! PostgreSQL server `TEST_DATABASE_URL` names), with its log captured for inspection.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different part of this module"
)]
#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test support: a failure here is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;

pub mod edge;
pub mod github;
pub mod hostile;
pub mod postgres;

/// The admin token every test app accepts.
pub const ADMIN_TOKEN: &str = "test-admin-token-aaaaaaaaaaaaaaaaaaaaaaaaaa";

/// The audit chain's key every test app and every `origin` command of a test uses.
pub const AUDIT_CHAIN_KEY: &str = "test-audit-chain-key-dddddddddddddddddddd";

/// How old `/healthz`'s figures may be (origin reads them at most once a second), with a margin.
pub const FIGURES_MAX_AGE: Duration = Duration::from_millis(1100);

/// Builds the `origin` binary once per test process (a no-op when it is fresh) and returns its path.
pub fn origin_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let output = latchkey_tests::cargo()
            .args([
                "build",
                "--quiet",
                "-p",
                "latchkey-origin",
                "--bin",
                "origin",
                "--message-format=json",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo build");
        assert!(output.status.success(), "cargo build of origin failed");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter_map(|msg| msg["executable"].as_str().map(PathBuf::from))
            .next_back()
            .expect("cargo reported the origin executable")
    })
}

/// The PostgreSQL server the test apps use, when `LATCHKEY_TEST_BACKEND=postgres` (`./dev test`
/// runs the suites where the backend matters a second time so); `None`: SQLite files.
pub fn postgres_server() -> Option<&'static str> {
    static SERVER: OnceLock<Option<String>> = OnceLock::new();
    SERVER
        .get_or_init(|| match std::env::var("LATCHKEY_TEST_BACKEND").as_deref() {
            Ok("postgres") => Some(std::env::var("TEST_DATABASE_URL").expect(
                "LATCHKEY_TEST_BACKEND=postgres needs TEST_DATABASE_URL (a server whose user may \
                 create databases; ./dev test starts one)",
            )),
            Ok("sqlite") | Err(_) => None,
            Ok(other) => panic!("LATCHKEY_TEST_BACKEND={other}: sqlite or postgres"),
        })
        .as_deref()
}

/// A new, empty database on the PostgreSQL test server; its URL.
pub async fn fresh_postgres_database(server: &str) -> String {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(server)
        .await
        .expect("connect to TEST_DATABASE_URL");
    let mut name = [0u8; 8];
    getrandom::fill(&mut name).expect("random");
    let name = format!("latchkey_{}", hex::encode(name));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create database");
    let _ = admin.close().await;
    let (base, query) = server
        .split_once('?')
        .map_or((server, None), |(b, q)| (b, Some(q)));
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    match query {
        Some(query) => format!("{}/{name}?{query}", &base[..path]),
        None => format!("{}/{name}", &base[..path]),
    }
}

/// Settings for a test app beyond the defaults.
#[derive(Default, Clone)]
pub struct TestAppBuilder {
    env: Vec<(String, String)>,
    umask: Option<u32>,
    sqlite: bool,
}

impl TestAppBuilder {
    /// Sets an environment variable for origin.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Runs origin on a SQLite file whatever `LATCHKEY_TEST_BACKEND` says.
    pub fn on_sqlite(mut self) -> Self {
        self.sqlite = true;
        self
    }

    /// Runs origin under this file-creation mask (through `sh -c 'umask …; exec …'`).
    pub fn umask(mut self, mask: u32) -> Self {
        self.umask = Some(mask);
        self
    }

    /// Starts origin over a new, empty database.
    pub async fn start(self) -> TestApp {
        let dir = tempfile::tempdir().expect("temp dir");
        let given = self
            .env
            .iter()
            .rev()
            .find(|(name, _)| name == "DATABASE_URL")
            .map(|(_, url)| url.clone());
        let database = match (given, postgres_server().filter(|_| !self.sqlite)) {
            (Some(url), _) => url,
            (None, Some(server)) => fresh_postgres_database(server).await,
            (None, None) => format!("sqlite://{}", dir.path().join("latchkey.db").display()),
        };
        let mut app = TestApp {
            base: String::new(),
            database,
            dir,
            child: None,
            env: self.env,
            umask: self.umask,
            http: reqwest::Client::new(),
            runs: 0,
        };
        app.spawn().await;
        app
    }
}

/// A running origin.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// `DATABASE_URL`.
    database: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    env: Vec<(String, String)>,
    umask: Option<u32>,
    http: reqwest::Client,
    runs: u32,
}

/// A response: status and JSON body (`Value::Null` if the body was not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl TestApp {
    pub fn builder() -> TestAppBuilder {
        TestAppBuilder::default()
    }

    pub async fn start() -> TestApp {
        Self::builder().start().await
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("latchkey.db")
    }

    /// Where origin writes the audit chain's checkpoints by default: beside the database.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.dir.path().join("latchkey.db.audit-checkpoints")
    }

    /// The app's temporary folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn database_url(&self) -> String {
        self.database.clone()
    }

    /// Runs SQL on the app's database behind origin's back (to tamper, say): `sqlite` on a
    /// SQLite file (through Python's sqlite3), `postgres` on a PostgreSQL database.
    pub async fn tamper(&self, sqlite: &str, postgres: &str) {
        if self.database.starts_with("postgres") {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&self.database)
                .await
                .expect("connect");
            sqlx::raw_sql(postgres)
                .execute(&mut conn)
                .await
                .expect("tamper");
            let _ = conn.close().await;
            return;
        }
        let out = Command::new("python3")
            .args([
                "-c",
                "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.executescript(sys.argv[2]); c.commit()",
            ])
            .arg(self.db_path())
            .arg(sqlite)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn log_path(&self, run: u32) -> PathBuf {
        self.dir.path().join(format!("origin-{run}.log"))
    }

    /// Everything origin has logged, over all its runs.
    pub fn logs(&self) -> String {
        (1..=self.runs)
            .map(|run| std::fs::read_to_string(self.log_path(run)).unwrap_or_default())
            .collect()
    }

    async fn spawn(&mut self) {
        self.runs += 1;
        let log_path = self.log_path(self.runs);
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = match self.umask {
            None => Command::new(origin_binary()),
            Some(mask) => {
                let mut sh = Command::new("/bin/sh");
                sh.arg("-c")
                    .arg(format!("umask {mask:03o} && exec \"$0\" \"$@\""))
                    .arg(origin_binary());
                sh
            }
        };
        cmd.arg("serve")
            .env_clear()
            .env("ORIGIN_LISTEN", "127.0.0.1:0")
            .env("DATABASE_URL", self.database_url())
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("AUDIT_CHAIN_KEY", AUDIT_CHAIN_KEY)
            .env("RUST_LOG", "trace")
            .envs(self.checkpoint_env())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn origin");
        self.child = Some(child);

        // Origin binds port 0 and logs the address it got: no port races between tests.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(addr) = text
                .lines()
                .filter(|l| l.contains("origin listening"))
                .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("listen=")))
            {
                self.base = format!("http://{addr}");
                break;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("origin exited with {status} before listening:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "origin did not start listening:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops origin with SIGTERM (a clean shutdown) and waits for it.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().expect("wait").is_none() {
                assert!(Instant::now() < deadline, "origin did not stop on SIGTERM");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Kills origin with SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sets (or replaces) an environment variable for origin's next start.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_owned(), value.to_owned()));
    }

    /// Starts origin again over the same database.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn().await;
    }

    /// Starts origin again after [`TestApp::kill`].
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn().await;
    }

    /// Runs `origin <args>` against this app's database.
    pub fn run_command(&self, args: &[&str]) -> std::process::Output {
        self.run_command_with(args, &[])
    }

    /// With PostgreSQL, checkpoints have no database file to sit beside: they go where
    /// [`TestApp::checkpoint_path`] says, as a SQLite app's do by default.
    fn checkpoint_env(&self) -> Vec<(&'static str, String)> {
        match self.database.starts_with("postgres") {
            true => vec![(
                "AUDIT_CHECKPOINT_FILE",
                self.checkpoint_path().display().to_string(),
            )],
            false => Vec::new(),
        }
    }

    /// Runs `origin <args>` against this app's database with extra environment variables.
    pub fn run_command_with(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        Command::new(origin_binary())
            .args(args)
            .env_clear()
            .env("DATABASE_URL", self.database_url())
            .env("AUDIT_CHAIN_KEY", AUDIT_CHAIN_KEY)
            .envs(self.checkpoint_env())
            .envs(env.iter().copied())
            .output()
            .expect("run origin command")
    }

    /// A request with the admin token.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            req = req.json(&body);
        }
        Self::reply(req.send().await.expect("request")).await
    }

    /// A request built by the caller (for bad headers and raw bodies).
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    pub async fn send(req: reqwest::RequestBuilder) -> Reply {
        Self::reply(req.send().await.expect("request")).await
    }

    async fn reply(resp: reqwest::Response) -> Reply {
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            body,
            headers,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> Reply {
        self.call(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str, body: Value) -> Reply {
        self.call(Method::DELETE, path, Some(body)).await
    }

    /// Verifies `secret` through the Clerk surface, requiring `required` scopes.
    pub async fn verify(&self, secret: &str, required: &[&str]) -> Reply {
        self.post(
            "/v1/api_keys/verify",
            serde_json::json!({ "secret": secret, "required_scopes": required }),
        )
        .await
    }

    /// Creates a key through the Clerk surface; returns `(id, secret)`.
    pub async fn create_key(&self, subject: &str, scopes: &[&str]) -> (String, String) {
        let r = self
            .post("/v1/api_keys", serde_json::json!({ "name": format!("{subject} key"), "subject": subject, "scopes": scopes }))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        (
            r.body["id"].as_str().expect("id").to_owned(),
            r.body["secret"].as_str().expect("secret").to_owned(),
        )
    }

    /// The publishers' figures, and whether they were computed after `began`: the admin
    /// status (always fresh) where the test's admin token is taken, else `/healthz` (whose
    /// figures may be a second old: fresh once read more than [`FIGURES_MAX_AGE`] after
    /// `began`).
    async fn publishing_figures(&self, began: Instant) -> (Reply, bool) {
        let status = self.get("/v1/status").await;
        if status.status == StatusCode::OK {
            return (status, true);
        }
        let health = self.get("/healthz").await;
        (health, began.elapsed() > FIGURES_MAX_AGE)
    }

    /// Waits until KV has every change (the ledger may lag, or be down on purpose); returns
    /// the last answer read. Only figures computed after the wait began count (and so after
    /// the change that came before it): see [`Self::publishing_figures`]. No admin token
    /// needed: some tests make origin refuse theirs.
    pub async fn wait_kv_published(&self, limit: Duration) -> Reply {
        let began = std::time::Instant::now();
        eventually(limit, || async {
            let (health, fresh) = self.publishing_figures(began).await;
            if fresh && health.body["kv_publisher"]["pending"] == 0 {
                Ok(health)
            } else {
                Err(format!("KV outbox not drained: {}", health.body))
            }
        })
        .await
    }

    /// Waits until the outbox is empty (everything acknowledged is in KV, and in the change
    /// ledger when origin feeds one); returns the last answer read, counting only figures
    /// computed after the wait began (see [`Self::publishing_figures`]).
    pub async fn wait_published(&self, limit: Duration) -> Reply {
        let began = std::time::Instant::now();
        eventually(limit, || async {
            let (health, fresh) = self.publishing_figures(began).await;
            // Published: in KV, and in the change ledger when origin feeds one.
            let ledger = &health.body["ledger"];
            if fresh
                && health.body["kv_publisher"]["pending"] == 0
                && (ledger["enabled"] != true || ledger["pending"] == 0)
            {
                Ok(health)
            } else {
                Err(format!("outbox not drained: {}", health.body))
            }
        })
        .await
    }

    /// All bytes of the database: main file, WAL and shared memory.
    pub fn database_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for suffix in ["", "-wal", "-shm"] {
            let path = PathBuf::from(format!("{}{suffix}", self.db_path().display()));
            all.extend(std::fs::read(path).unwrap_or_default());
        }
        all
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 20 ms until it answers `Ok`, and returns that; fails the test with the
/// last `Err` if `limit` passes first. For states that arrive asynchronously (KV publication,
/// usage flushes, log lines).
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) => assert!(started.elapsed() < limit, "not within {limit:?}: {last}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The time now, in unix ms (as origin's answers give times).
pub fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since.as_millis()).expect("fits")
}

/// Whether `needle` occurs anywhere in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

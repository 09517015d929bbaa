//! The edge side of the end-to-end tests: the real Worker under `wrangler dev` (workerd, with
//! its real local KV on disk), the demo upstream it forwards to, and [`Stack`], which wires them
//! to a real origin the way `./dev run` does.
//!
//! Every process here is started in its own process group and the whole group is killed on
//! drop, so `workerd` children never outlive a test, even a failing one.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::{Reply, TestApp};

/// The KV namespace id in `wrangler.toml` (local: any id works, this one is the binding's).
pub const KV_NAMESPACE_ID: &str = "00000000000000000000000000000000";
/// The gateway signing secret shared by the edge and the demo upstream in tests.
pub const UPSTREAM_SECRET: &str = "test-upstream-signing-secret-bbbbbbbbbbbb";
/// The usage signing secret shared by the edge and origin in tests.
pub const USAGE_SECRET: &str = "test-usage-signing-secret-cccccccccccccc";
/// The ledger signing secret shared by origin and the edge in tests.
pub const LEDGER_SECRET: &str = "test-ledger-signing-secret-dddddddddddd";

/// The repository root (wrangler.toml, node_modules).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Builds the Worker once per test process (a no-op when `edge/build` is fresh), so that the
/// `wrangler dev` instances the tests start never build concurrently.
fn build_worker() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(repo_root().join("edge/build.sh"))
            .current_dir(repo_root())
            .status()
            .expect("run edge/build.sh");
        assert!(status.success(), "edge/build.sh failed");
    });
}

/// A loopback port for a child that must be told its port (wrangler cannot take a bound
/// listener). It is bound to check it is free, then released, so another process could take it
/// before the child binds it; two things keep that from happening here: the port lies below the
/// kernel's ephemeral range, where no process binding port 0 (origin, the demo upstream) and no
/// outgoing connection's source port can land, and a per-process counter keeps the tests of one
/// binary from picking the same one. Should wrangler still find it taken, it would serve on
/// another port, which [`Edge::start`] detects.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Below Linux's default ephemeral range (32768-60999) and above the well-known services.
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Test binaries run one after another; the process id spreads them over the span anyway.
    let start = u16::try_from(std::process::id() % u32::from(SPAN)).expect("fits");
    for _ in 0..SPAN {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) % SPAN;
        let port = FIRST + offset;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN);
}

/// A well-formed key (valid checksum) that was never issued.
pub fn unissued_key(prefix: &str) -> String {
    let prefix = latchkey_shared::KeyPrefix::parse(prefix).expect("prefix");
    let mut counter = 7u8;
    let key = latchkey_shared::ApiKey::generate(&prefix, &mut |buf: &mut [u8]| {
        for b in buf {
            counter = counter.wrapping_mul(31).wrapping_add(17);
            *b = counter;
        }
    });
    key.expose().to_owned()
}

/// Prints a measured figure where it shows even when the test passes (the test harness
/// captures `println!`, not direct writes), with a `MEASURED` tag `./dev test` collects.
pub fn report_measurement(line: &str) {
    let _ = writeln!(std::io::stderr(), "MEASURED {line}");
}

/// A child process that is the leader of its own process group.
struct Group {
    child: Child,
}

impl Group {
    fn spawn(mut cmd: Command, log: &Path) -> Self {
        let file = std::fs::File::create(log).expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file)
            .process_group(0);
        Self {
            child: cmd.spawn().expect("spawn"),
        }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM to the whole group, then SIGKILL to whatever is left of it.
    fn stop(mut self) {
        let group = format!("-{}", self.child.id());
        let signal = |sig: &str| {
            let _ = Command::new("kill")
                .args([sig, "--", &group])
                .stderr(Stdio::null())
                .status();
        };
        signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // workerd may outlive its parent: end the group regardless.
        signal("-KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `log` has a line containing `marker`, returning that line.
fn wait_for_line(
    log: &Path,
    marker: &str,
    group: &mut Group,
    what: &str,
    limit: Duration,
) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // Whole lines only: the last one may still be being written.
        let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
        if let Some(line) = complete.lines().find(|l| l.contains(marker)) {
            return line.to_owned();
        }
        if let Some(status) = group.exited() {
            panic!("{what} exited with {status} before it was ready:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} was not ready within {limit:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The demo upstream (`tests/src/bin/demo-upstream.rs`) on a port of its own.
pub struct Upstream {
    pub base: String,
    group: Option<Group>,
    _dir: tempfile::TempDir,
}

impl Upstream {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("upstream.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_demo-upstream"));
        cmd.env_clear()
            .env("UPSTREAM_LISTEN", "127.0.0.1:0")
            .env("UPSTREAM_SIGNING_SECRET", UPSTREAM_SECRET);
        let mut group = Group::spawn(cmd, &log);
        let line = wait_for_line(
            &log,
            "listen=",
            &mut group,
            "demo upstream",
            Duration::from_secs(10),
        );
        let addr = line.rsplit("listen=").next().expect("address").trim();
        Self {
            base: format!("http://{addr}"),
            group: Some(group),
            _dir: dir,
        }
    }
}

impl Upstream {
    /// Stops the upstream (the gateway then answers `502 upstream_unavailable`).
    pub fn stop(&mut self) {
        if let Some(group) = self.group.take() {
            group.stop();
        }
    }

    /// Everything the upstream logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("upstream.log")).unwrap_or_default()
    }

    /// How many requests the upstream has received (it logs one line per request).
    pub fn calls(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.starts_with("request "))
            .count()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(group) = self.group.take() {
            group.stop();
        }
    }
}

/// The Worker under `wrangler dev`, with its local KV persisted in a temporary folder (so a
/// restart keeps the namespace, as production KV would).
pub struct Edge {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    port: u16,
    vars: Vec<(String, String)>,
    /// Start without the ledger's Durable Object binding (see [`Edge::without_ledger_object`]).
    no_ledger_object: bool,
    dir: tempfile::TempDir,
    group: Option<Group>,
    runs: u32,
    http: reqwest::Client,
}

impl Edge {
    /// An edge on a free port, not started yet (so origin can be given its KV URL first).
    pub fn on_free_port() -> Self {
        build_worker();
        let port = free_port();
        Self {
            base: format!("http://127.0.0.1:{port}"),
            port,
            vars: vec![
                ("UPSTREAM_SIGNING_SECRET".into(), UPSTREAM_SECRET.into()),
                ("USAGE_SIGNING_SECRET".into(), USAGE_SECRET.into()),
                ("LEDGER_SIGNING_SECRET".into(), LEDGER_SECRET.into()),
                ("DEBUG_HEADERS".into(), "true".into()),
                ("USAGE_FLUSH_MS".into(), "300".into()),
            ],
            no_ledger_object: false,
            dir: tempfile::tempdir().expect("temp dir"),
            group: None,
            runs: 0,
            http: reqwest::Client::new(),
        }
    }

    /// Sets a `[vars]` value (or secret) for the Worker's next start.
    pub fn var(&mut self, name: &str, value: &str) -> &mut Self {
        self.vars.retain(|(k, _)| k != name);
        self.vars.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Removes a `[vars]` value or secret for the Worker's next start.
    pub fn unset_var(&mut self, name: &str) -> &mut Self {
        self.vars.retain(|(k, _)| k != name);
        self
    }

    /// From the next start, runs the Worker from a copy of `wrangler.toml` without the ledger's
    /// Durable Object binding: the ledger is unreachable, as when the object cannot be reached.
    pub fn without_ledger_object(&mut self) -> &mut Self {
        self.no_ledger_object = true;
        self
    }

    /// The address origin appends ledger changes to.
    pub fn ledger_url(&self) -> String {
        format!("{}{}", self.base, latchkey_shared::ledger::APPEND_PATH)
    }

    /// Where wrangler writes its own debug log files (`WRANGLER_LOG_PATH`; by default they go
    /// to `~/.wrangler/logs/`, out of the test's reach).
    pub fn debug_log_dir(&self) -> PathBuf {
        self.dir.path().join("wrangler-debug-logs")
    }

    /// Where `wrangler dev` persists the local KV (`--persist-to`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The KV REST API base that origin's publisher writes to.
    pub fn kv_api_base(&self) -> String {
        format!("{}/cdn-cgi/explorer/api", self.base)
    }

    fn kv_value_url(&self, entry: &str) -> String {
        format!(
            "{}/storage/kv/namespaces/{KV_NAMESPACE_ID}/values/{entry}",
            self.kv_api_base()
        )
    }

    /// The value of KV entry `entry`, read through the local KV REST API (as origin reads it).
    pub async fn read_kv(&self, entry: &str) -> Vec<u8> {
        let response = self
            .http
            .get(self.kv_value_url(entry))
            .send()
            .await
            .expect("read KV");
        response.bytes().await.expect("KV value").to_vec()
    }

    /// Writes `value` to KV entry `entry` behind origin's back.
    pub async fn write_kv(&self, entry: &str, value: &[u8]) {
        let put = self
            .http
            .put(self.kv_value_url(entry))
            .body(value.to_vec())
            .send()
            .await
            .expect("write KV");
        assert!(put.status().is_success(), "KV write: {}", put.status());
    }

    fn log_path(&self, run: u32) -> PathBuf {
        self.dir.path().join(format!("wrangler-{run}.log"))
    }

    /// Everything wrangler and the Worker logged, over all runs.
    pub fn logs(&self) -> String {
        (1..=self.runs)
            .map(|run| std::fs::read_to_string(self.log_path(run)).unwrap_or_default())
            .collect()
    }

    /// Starts `wrangler dev` from the repository's own `wrangler.toml`, and waits until the
    /// Worker answers.
    pub async fn start(&mut self) {
        self.start_until(StatusCode::OK).await;
    }

    /// Starts a Worker whose settings are wrong: ready once it answers `503`.
    pub async fn start_expecting_misconfiguration(&mut self) {
        self.start_until(StatusCode::SERVICE_UNAVAILABLE).await;
    }

    async fn start_until(&mut self, ready: StatusCode) {
        assert!(self.group.is_none(), "already running");
        self.runs += 1;
        let log = self.log_path(self.runs);
        let mut cmd = Command::new(repo_root().join("node_modules/.bin/wrangler"));
        cmd.current_dir(repo_root())
            .env("WRANGLER_SEND_METRICS", "false")
            // The most verbose level: the secrets test scans these logs.
            .env("WRANGLER_LOG", "debug")
            .env("WRANGLER_LOG_PATH", self.debug_log_dir())
            .env("CI", "1")
            .args(["dev", "--ip", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--inspector-port", &free_port().to_string()])
            .arg("--persist-to")
            .arg(self.state_dir());
        if self.no_ledger_object {
            cmd.arg("--config").arg(self.config_without_ledger_object());
        }
        // An env file of its own (empty), so that the `.dev.vars` `./dev run` leaves in the
        // repository never adds settings to a test's Worker.
        let env_file = self.dir.path().join("empty.env");
        std::fs::write(&env_file, "").expect("write the empty env file");
        cmd.arg("--env-file").arg(env_file);
        for (name, value) in &self.vars {
            cmd.args(["--var", &format!("{name}:{value}")]);
        }
        let mut group = Group::spawn(cmd, &log);
        let ready_line = wait_for_line(
            &log,
            "Ready on",
            &mut group,
            "wrangler dev",
            Duration::from_secs(90),
        );
        self.group = Some(group);
        // wrangler moves to another port when the one it was given is taken: then this edge's
        // address (already handed to origin) would name someone else's server.
        assert!(
            ready_line.trim_end().ends_with(&format!(":{}", self.port)),
            "wrangler dev did not get port {} ({ready_line}): another process took it",
            self.port
        );
        // Ready means listening; wait for the Worker itself to answer.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let probe = self
                .http
                .post(format!("{}/v1/api_keys/verify", self.base))
                .json(&json!({ "key": "probe" }))
                .send()
                .await;
            if probe.is_ok_and(|r| r.status() == ready) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Worker never answered:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A copy of `wrangler.toml` without the Durable Object binding and its migration (and
    /// without the build step: the Worker is already built), next to the original so that its
    /// relative paths still hold.
    fn config_without_ledger_object(&self) -> PathBuf {
        let text =
            std::fs::read_to_string(repo_root().join("wrangler.toml")).expect("wrangler.toml");
        let mut out = String::new();
        let mut skipping = false;
        for line in text.lines() {
            if line.starts_with('[') {
                skipping = matches!(
                    line.trim(),
                    "[[durable_objects.bindings]]" | "[[migrations]]" | "[build]"
                );
            }
            if !skipping {
                out.push_str(line);
                out.push('\n');
            }
        }
        assert!(!out.contains("LEDGER\""), "the binding is gone");
        let path = self.config_copy_path();
        std::fs::write(&path, out).expect("write the config copy");
        path
    }

    fn config_copy_path(&self) -> PathBuf {
        repo_root().join(format!(".wrangler-no-ledger-{}.toml", self.port))
    }

    /// Stops wrangler, workerd and everything else in their process group.
    pub fn stop(&mut self) {
        if let Some(group) = self.group.take() {
            group.stop();
        }
    }

    /// `POST /v1/api_keys/verify` at the edge.
    pub async fn verify(&self, key: &str, required: &[&str]) -> Reply {
        let req = self
            .http
            .post(format!("{}/v1/api_keys/verify", self.base))
            .json(&json!({ "key": key, "required_scopes": required }));
        TestApp::send(req).await
    }

    /// A gateway request, with `Authorization: Bearer <key>` when a key is given.
    pub async fn gateway(&self, method: Method, path: &str, key: Option<&str>) -> Reply {
        let mut req = self.request(method, path);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        TestApp::send(req).await
    }

    /// A request built by the caller.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    /// Polls the edge's verify until `done` holds for its answer (KV publication is
    /// asynchronous); returns the answer and how long it took.
    pub async fn verify_until(
        &self,
        key: &str,
        required: &[&str],
        limit: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> (Value, Duration) {
        let started = Instant::now();
        loop {
            let reply = self.verify(key, required).await;
            assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
            if done(&reply.body) {
                return (reply.body, started.elapsed());
            }
            assert!(
                started.elapsed() < limit,
                "the edge did not reach the expected state within {limit:?}; last answer {}",
                reply.body
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.stop();
        if self.no_ledger_object {
            let _ = std::fs::remove_file(self.config_copy_path());
        }
    }
}

/// Origin, edge and upstream wired together as `./dev run` wires them: origin publishes to the
/// edge's local KV, the edge forwards to the upstream and reports usage to origin.
pub struct Stack {
    pub origin: TestApp,
    pub edge: Edge,
    pub upstream: Upstream,
}

impl Stack {
    /// Starts all three. `origin_env` adds to origin's environment.
    pub async fn start(origin_env: &[(&str, &str)]) -> Self {
        Self::start_with(origin_env, &[]).await
    }

    /// Starts all three; `origin_env` adds to origin's environment, `edge_vars` to the Worker's
    /// vars (an empty value unsets one).
    pub async fn start_with(origin_env: &[(&str, &str)], edge_vars: &[(&str, &str)]) -> Self {
        let upstream = Upstream::start();
        let mut edge = Edge::on_free_port();
        let mut builder = TestApp::builder()
            .env("KV_API_BASE", &edge.kv_api_base())
            .env("KV_NAMESPACE_ID", KV_NAMESPACE_ID)
            .env("KV_RETRY_MAX_MS", "500")
            .env("USAGE_SIGNING_SECRET", USAGE_SECRET)
            .env("LEDGER_URL", &edge.ledger_url())
            .env("LEDGER_SIGNING_SECRET", LEDGER_SECRET)
            .env("LAST_USED_FLUSH_MS", "100");
        for (name, value) in origin_env {
            builder = builder.env(name, value);
        }
        let origin = builder.start().await;
        edge.var("UPSTREAM_URL", &upstream.base)
            .var("ORIGIN_USAGE_URL", &format!("{}/v1/usage", origin.base));
        for (name, value) in edge_vars {
            if value.is_empty() {
                edge.unset_var(name);
            } else {
                edge.var(name, value);
            }
        }
        edge.start().await;
        let stack = Self {
            origin,
            edge,
            upstream,
        };
        stack.wait_ledger_fed().await;
        stack
    }

    /// Waits until origin's ledger publisher has had a watermark accepted (origin starts before
    /// the edge, so its first appends fail and back off).
    pub async fn wait_ledger_fed(&self) {
        super::eventually(Duration::from_secs(30), || async {
            let health = self.origin.get("/healthz").await;
            let ledger = &health.body["ledger"];
            if ledger["state"] == "ok"
                && ledger["watermark_age_ms"]
                    .as_u64()
                    .is_some_and(|ms| ms < 1500)
            {
                Ok(())
            } else {
                Err(format!("the ledger is not fed yet: {ledger}"))
            }
        })
        .await;
    }

    /// Creates a key through the tutorial surface; returns `(id, secret)`.
    pub async fn create(&self, scopes: &[&str], extra: Value) -> (String, String) {
        let mut body =
            json!({ "name": "e2e", "scopes": scopes, "metadata": { "partner_id": "acme-corp" } });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let r = self.origin.post("/backend.api-keys.create", body).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        (
            r.body["id"].as_str().expect("id").to_owned(),
            r.body["key"].as_str().expect("key").to_owned(),
        )
    }

    /// Revokes through the tutorial surface.
    pub async fn revoke(&self, id: &str) {
        let r = self
            .origin
            .delete("/backend.api-keys.revoke", json!({ "key_id": id }))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }

    /// Switches a key off (`true`) or on through the tutorial surface's update.
    pub async fn set_disabled(&self, id: &str, disabled: bool) {
        let r = self
            .origin
            .patch(
                "/backend.api-keys.update",
                json!({ "key_id": id, "disabled": disabled }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }

    /// Waits until origin's outbox is empty (everything acknowledged is in KV).
    pub async fn wait_published(&self, limit: Duration) {
        self.origin.wait_published(limit).await;
    }
}

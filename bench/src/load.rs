//! HTTP load through `oha` (crates.io; `./dev bench` installs a pinned version): keep-alive
//! connections, a fixed duration, optionally a fixed request rate, JSON results.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

/// One kind of request, and how hard to send it.
#[derive(Debug, Clone)]
pub(crate) struct Load {
    url: String,
    method: &'static str,
    body: Option<String>,
    headers: Vec<(String, String)>,
    connections: u32,
    rate: Option<f64>,
}

/// What one run of a load measured.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    pub(crate) rps: f64,
    pub p99_ms: f64,
    /// (percentile, milliseconds), for the chart.
    pub(crate) percentiles: Vec<(f64, f64)>,
}

/// Percentiles oha reports, as (its key, the percentile).
const PERCENTILES: [(&str, f64); 7] = [
    ("p50", 50.0),
    ("p75", 75.0),
    ("p90", 90.0),
    ("p95", 95.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
    ("p99.99", 99.99),
];

impl Load {
    pub(crate) fn get(url: &str) -> Self {
        Self {
            url: url.into(),
            method: "GET",
            body: None,
            headers: Vec::new(),
            connections: 16,
            rate: None,
        }
    }

    pub(crate) fn post(url: &str, body: &str) -> Self {
        Self {
            method: "POST",
            body: Some(body.into()),
            ..Self::get(url)
        }
    }

    pub(crate) fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub(crate) fn connections(mut self, n: u32) -> Self {
        self.connections = n;
        self
    }

    /// The same request (method, path, query, headers, body) sent to the server at `base`
    /// (`http://host:port`) instead: how a ceiling gets exactly the traffic it is compared with.
    pub(crate) fn sent_to(&self, base: &str) -> Self {
        let after_scheme = self.url.find("://").map_or(0, |i| i + 3);
        let path = self.url[after_scheme..]
            .find('/')
            .map_or("/", |i| &self.url[after_scheme + i..]);
        Self {
            url: format!("{base}{path}"),
            ..self.clone()
        }
    }

    /// The request's method, path (with its query), headers and body (empty if none).
    pub(crate) fn parts(&self) -> (&str, &str, &[(String, String)], &str) {
        let after_scheme = self.url.find("://").map_or(0, |i| i + 3);
        let path = self.url[after_scheme..]
            .find('/')
            .map_or("/", |i| &self.url[after_scheme + i..]);
        (
            self.method,
            path,
            &self.headers,
            self.body.as_deref().unwrap_or_default(),
        )
    }

    /// Sends at most `rps` requests per second instead of as many as possible.
    pub(crate) fn rate(mut self, rps: f64) -> Self {
        self.rate = Some(rps.max(1.0));
        self
    }

    /// Runs the load for `duration`. Fails the bench if more than 1% of answers are errors
    /// (a benchmark of failures would measure nothing).
    pub(crate) fn run(&self, duration: Duration) -> Run {
        let mut cmd = Command::new("oha");
        cmd.args(["--no-tui", "--output-format", "json"])
            .args(["-z", &format!("{}s", duration.as_secs().max(1))])
            .args(["-c", &self.connections.to_string()])
            .args(["-m", self.method]);
        if let Some(rate) = self.rate {
            cmd.args(["-q", &format!("{rate:.0}")]);
        }
        for (name, value) in &self.headers {
            cmd.args(["-H", &format!("{name}: {value}")]);
        }
        if let Some(body) = &self.body {
            cmd.args(["-d", body]);
        }
        cmd.arg(&self.url);
        let out = cmd.output().expect("run oha (./dev bench installs it)");
        assert!(
            out.status.success(),
            "oha failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("oha JSON");
        let statuses = &v["statusCodeDistribution"];
        let total: u64 = statuses
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        let errors: u64 = statuses.as_object().map_or(0, |m| {
            m.iter()
                .filter(|(code, _)| code.starts_with('5'))
                .filter_map(|(_, n)| n.as_u64())
                .sum()
        }) + v["errorDistribution"].as_object().map_or(0, |m| {
            // Requests still in flight when the duration ends are cut off by oha, not failed.
            m.iter()
                .filter(|(kind, _)| !kind.contains("aborted due to deadline"))
                .filter_map(|(_, n)| n.as_u64())
                .sum()
        });
        assert!(
            total > 0 && errors * 100 <= total,
            "{} {}: {errors} errors in {total} answers: {statuses} {}",
            self.method,
            self.url,
            v["errorDistribution"]
        );
        let ms = |key: &str| v["latencyPercentiles"][key].as_f64().unwrap_or(f64::NAN) * 1000.0;
        Run {
            rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
            p99_ms: ms("p99"),
            percentiles: PERCENTILES.iter().map(|(k, p)| (*p, ms(k))).collect(),
        }
    }
}

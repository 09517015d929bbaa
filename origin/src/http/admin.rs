//! Admin authentication: one `Authorization: Bearer <token>` header naming a configured admin
//! token, compared in constant time; and a per-address limit on failed attempts, so a token
//! cannot be guessed at network speed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::Actor;
use super::error::{ApiError, Envelope};
use crate::config::AdminToken;

/// What admin routes check: the accepted tokens and the failure limiter.
#[derive(Clone)]
pub struct AdminGuard {
    tokens: Arc<[AdminToken]>,
    failures: Arc<FailureLimiter>,
}

impl AdminGuard {
    /// A guard accepting `tokens`, allowing `failures_per_minute` failed attempts per address.
    pub fn new(tokens: Arc<[AdminToken]>, failures_per_minute: u32) -> Self {
        Self {
            tokens,
            failures: Arc::new(FailureLimiter::new(failures_per_minute, WINDOW)),
        }
    }
}

/// The window failed attempts are counted over.
const WINDOW: Duration = Duration::from_secs(60);

/// Addresses tracked at most; past this, finished windows are dropped first.
const TRACKED_MAX: usize = 100_000;

/// Counts failed admin authentications per client address in fixed windows.
#[derive(Debug)]
pub struct FailureLimiter {
    per_window: u32,
    window: Duration,
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// When the last block of any address ends, in nanoseconds after `epoch`: until some
    /// address is blocked, every admin request passes without taking the lock.
    blocks_end: AtomicU64,
    epoch: Instant,
}

impl FailureLimiter {
    /// A limiter allowing `per_window` failures per `window` and address.
    pub fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window,
            window,
            windows: Mutex::new(HashMap::new()),
            blocks_end: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// If `ip` used up its failures, how long until it may try again.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        if self.nanos(now) >= self.blocks_end.load(Ordering::Relaxed) {
            return None;
        }
        let windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let (started, failures) = windows.get(&ip)?;
        let ends = *started + self.window;
        (*failures >= self.per_window && now < ends).then(|| ends - now)
    }

    /// Counts one failure of `ip`.
    pub fn fail(&self, ip: IpAddr, now: Instant) {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        if windows.len() >= TRACKED_MAX {
            windows.retain(|_, (started, _)| now < *started + self.window);
        }
        let entry = windows.entry(ip).or_insert((now, 0));
        if now >= entry.0 + self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        if entry.1 >= self.per_window {
            let ends = self.nanos(entry.0 + self.window);
            self.blocks_end.fetch_max(ends, Ordering::Relaxed);
        }
    }
}

/// Requires exactly one `Authorization: Bearer <token>` header naming a configured admin token.
/// Every configured token is compared in constant time, so timing reveals nothing. Malformed and
/// wrong tokens count against the client's address; past the limit it gets 429 (even with a
/// right token) until its window ends. A missing header is not a guess and is not counted.
pub async fn require_admin<E: Envelope>(
    State(guard): State<AdminGuard>,
    mut req: Request,
    next: Next,
) -> Response {
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    let now = Instant::now();
    if let Some(wait) = guard.failures.blocked(ip, now) {
        return too_many_failures::<E>(wait);
    }
    let refuse = |message: &str| {
        guard.failures.fail(ip, now);
        tracing::warn!(client = %ip, "admin authentication failed");
        ApiError::<E>::unauthorized(message).into_response()
    };

    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    let value = match (values.next(), values.next()) {
        (None, _) => {
            return ApiError::<E>::unauthorized(
                "Send an `Authorization: Bearer <admin token>` header.",
            )
            .into_response();
        }
        (Some(_), Some(_)) => {
            return refuse("Send exactly one `Authorization: Bearer <admin token>` header.");
        }
        (Some(value), None) => value,
    };
    let presented = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let Some(presented) = presented else {
        return refuse("The Authorization header must be `Bearer <admin token>`.");
    };
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut matched: Option<&AdminToken> = None;
    for token in guard.tokens.iter() {
        if bool::from(token.digest().ct_eq(&digest)) {
            matched = Some(token);
        }
    }
    match matched {
        Some(token) => {
            req.extensions_mut().insert(Actor(token.shared_label()));
            next.run(req).await
        }
        None => refuse("The admin token is not valid."),
    }
}

fn too_many_failures<E: Envelope>(wait: Duration) -> Response {
    let seconds = wait.as_secs() + 1;
    let mut response = ApiError::<E>::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_failed_attempts",
        format!("Too many failed admin authentications from this address; retry in {seconds} s."),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_blocked_after_its_failures_until_the_window_ends() {
        let limiter = FailureLimiter::new(3, Duration::from_secs(60));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let t0 = Instant::now();
        for _ in 0..2 {
            limiter.fail(a, t0);
        }
        assert_eq!(limiter.blocked(a, t0), None, "two of three failures");
        limiter.fail(a, t0);
        assert_eq!(limiter.blocked(a, t0), Some(Duration::from_secs(60)));
        assert_eq!(
            limiter.blocked(b, t0),
            None,
            "other addresses are not affected"
        );
        let later = t0 + Duration::from_secs(61);
        assert_eq!(limiter.blocked(a, later), None, "the window ended");
        limiter.fail(a, later);
        assert_eq!(
            limiter.blocked(a, later),
            None,
            "a new window starts at zero"
        );
    }
}

//! Admin authentication: one `Authorization: Bearer <token>` header naming a configured admin
//! token, compared in constant time; and a per-client limit on failed attempts, which refuses
//! further wrong tokens from a client that sent too many, but never a right one.

use std::collections::hash_map::RandomState;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hashlink::LruCache;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::Actor;
use super::client::{TrustedProxies, client_key};
use super::error::{ApiError, Envelope};
use crate::config::AdminToken;

/// What admin routes check: the accepted tokens, the failure limiter, and the proxies whose
/// `X-Forwarded-For` names the client.
#[derive(Clone)]
pub struct AdminGuard {
    tokens: Arc<[AdminToken]>,
    failures: Arc<FailureLimiter>,
    proxies: TrustedProxies,
}

impl AdminGuard {
    /// A guard accepting `tokens`, allowing `failures_per_minute` failed attempts per client,
    /// where a client is the peer address, or behind one of `proxies` the forwarded one.
    pub fn new(
        tokens: Arc<[AdminToken]>,
        failures_per_minute: u32,
        proxies: TrustedProxies,
    ) -> Self {
        Self {
            tokens,
            failures: Arc::new(FailureLimiter::new(
                failures_per_minute,
                WINDOW,
                TRACKED_MAX,
            )),
            proxies,
        }
    }
}

/// The window failed attempts are counted over.
const WINDOW: Duration = Duration::from_secs(60);

/// Clients tracked at most (about 100 bytes each); past this the least recently failing one
/// is forgotten.
const TRACKED_MAX: NonZeroUsize = match NonZeroUsize::new(100_000) {
    Some(n) => n,
    None => NonZeroUsize::MIN,
};

/// Counts failed admin authentications per client (see [`client_key`]: IPv6 by /64) in fixed
/// windows. Memory is bounded: at most `capacity` clients, in least-recently-used order, so
/// making room is O(1) (the least recently failing client is forgotten) and nothing scans the
/// table under the lock. A flood from more than `capacity` addresses within a window can make
/// it forget a client early; that client then starts a new window.
#[derive(Debug)]
pub struct FailureLimiter {
    per_window: u32,
    window: Duration,
    /// SipHash with a random key (std's), so addresses cannot be chosen to collide.
    windows: Mutex<LruCache<IpAddr, Window, RandomState>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

/// What [`FailureLimiter::fail`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Counted: answer 401.
    Counted,
    /// Counted, and it used up the client's failures: answer 401; its next failures in the
    /// window get 429.
    LimitReached,
    /// The client already used up its failures: answer 429, retry after this long.
    Blocked(Duration),
}

impl FailureLimiter {
    /// A limiter allowing `per_window` failures per `window` and client, tracking at most
    /// `capacity` clients.
    pub fn new(per_window: u32, window: Duration, capacity: NonZeroUsize) -> Self {
        Self {
            per_window,
            window,
            windows: Mutex::new(LruCache::with_hasher(capacity.get(), RandomState::new())),
        }
    }

    /// A failed attempt by the client at `ip` (keyed by [`client_key`]): counted, or refused
    /// because the client is over its limit (a refused attempt is not counted, so it does not
    /// stretch the window). One lock, O(1).
    pub fn fail(&self, ip: IpAddr, now: Instant) -> Failure {
        let key = client_key(ip);
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(window) = windows.get_mut(&key) {
            let ends = window.started + self.window;
            if now < ends {
                if window.failures >= self.per_window {
                    return Failure::Blocked(ends - now);
                }
                window.failures = window.failures.saturating_add(1);
                return self.counted(window.failures);
            }
        }
        // A new window (the first failure, or the last window ended); evicts the least recently
        // used client if the table is full.
        windows.insert(
            key,
            Window {
                started: now,
                failures: 1,
            },
        );
        self.counted(1)
    }

    fn counted(&self, failures: u32) -> Failure {
        if failures >= self.per_window {
            Failure::LimitReached
        } else {
            Failure::Counted
        }
    }

    /// How many clients are tracked.
    pub fn tracked(&self) -> usize {
        self.windows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Requires exactly one `Authorization: Bearer <token>` header naming a configured admin token.
/// Every configured token is compared in constant time, so timing reveals nothing. A right
/// token always passes. A malformed or wrong one counts against the client (the peer address,
/// or behind a trusted proxy the forwarded one); past the limit, the client's wrong and
/// malformed tokens get 429 with `Retry-After` until its window ends. A missing header is not a
/// guess and is not counted.
///
/// The limit does not stop guessing on its own (a right token passes even from a client over
/// the limit, or anyone on a shared address could lock the admins out): tokens are long
/// enough (`MIN_ADMIN_TOKEN_LEN`) not to be guessed. It caps the cost and the log lines of a
/// flood of wrong tokens.
pub async fn require_admin<E: Envelope>(
    State(guard): State<AdminGuard>,
    mut req: Request,
    next: Next,
) -> Response {
    let refuse = |req: &Request, message: &str| {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
        let client = guard.proxies.client_address(peer, req.headers());
        match guard.failures.fail(client, Instant::now()) {
            Failure::Blocked(wait) => too_many_failures::<E>(wait),
            Failure::Counted => {
                tracing::warn!(%client, %peer, "admin authentication failed");
                ApiError::<E>::unauthorized(message).into_response()
            }
            Failure::LimitReached => {
                tracing::warn!(
                    %client,
                    %peer,
                    "admin authentication failed; the client used up its failures: its wrong \
                     tokens get 429 (not logged) until its minute is over"
                );
                ApiError::<E>::unauthorized(message).into_response()
            }
        }
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
            return refuse(
                &req,
                "Send exactly one `Authorization: Bearer <admin token>` header.",
            );
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
        return refuse(
            &req,
            "The Authorization header must be `Bearer <admin token>`.",
        );
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
        None => refuse(&req, "The admin token is not valid."),
    }
}

fn too_many_failures<E: Envelope>(wait: Duration) -> Response {
    let seconds = wait.as_secs().saturating_add(1);
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
    use std::net::Ipv6Addr;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn a_client_is_refused_after_its_failures_until_the_window_ends() {
        let limiter = FailureLimiter::new(3, WINDOW, TRACKED_MAX);
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(61);
        // (client, at, expected, why), in order.
        let steps: &[(&str, Instant, Failure, &str)] = &[
            ("10.0.0.1", t0, Failure::Counted, "first failure"),
            ("10.0.0.1", t0, Failure::Counted, "second"),
            ("10.0.0.1", t0, Failure::LimitReached, "third: the limit"),
            ("10.0.0.1", t0, Failure::Blocked(WINDOW), "over the limit"),
            ("10.0.0.2", t0, Failure::Counted, "another address"),
            (
                "10.0.0.1",
                t0 + Duration::from_secs(59),
                Failure::Blocked(Duration::from_secs(1)),
                "still blocked, one second left: refusals do not stretch it",
            ),
            ("10.0.0.1", later, Failure::Counted, "a new window"),
            ("2001:db8:1:2::1", t0, Failure::Counted, "IPv6"),
            ("2001:db8:1:2::2", t0, Failure::Counted, "same /64"),
            ("2001:db8:1:2:ffff::", t0, Failure::LimitReached, "same /64"),
            (
                "2001:db8:1:2::9",
                t0,
                Failure::Blocked(WINDOW),
                "the /64 is one client",
            ),
            ("2001:db8:1:3::1", t0, Failure::Counted, "the next /64"),
            (
                "::ffff:10.0.0.2",
                t0,
                Failure::Counted,
                "IPv4-mapped is the IPv4 client (its second failure)",
            ),
            ("10.0.0.2", t0, Failure::LimitReached, "third"),
            ("10.0.0.2", t0, Failure::Blocked(WINDOW), "over"),
        ];
        for (client, at, expected, why) in steps {
            assert_eq!(limiter.fail(ip(client), *at), *expected, "{client}: {why}");
        }
    }

    #[test]
    fn memory_is_bounded_and_the_least_recently_failing_client_goes_first() {
        let capacity = NonZeroUsize::new(1_000).expect("non-zero");
        let limiter = FailureLimiter::new(2, WINDOW, capacity);
        let now = Instant::now();
        let blocked = ip("192.0.2.1");
        limiter.fail(blocked, now);
        limiter.fail(blocked, now);
        assert!(matches!(limiter.fail(blocked, now), Failure::Blocked(_)));
        let quiet = ip("192.0.2.2");
        assert_eq!(limiter.fail(quiet, now), Failure::Counted);
        // A flood of distinct IPv6 /64s: the table never grows past its capacity.
        for i in 0..10_000u64 {
            let address = Ipv6Addr::from((0x2001_0db8_u128 << 96) | (u128::from(i) << 64) | 1);
            limiter.fail(IpAddr::V6(address), now);
            assert!(limiter.tracked() <= capacity.get());
            // The blocked client keeps failing, so it stays recent and is never forgotten.
            if i % 500 == 0 {
                assert!(
                    matches!(limiter.fail(blocked, now), Failure::Blocked(_)),
                    "after {i} other clients"
                );
            }
        }
        assert_eq!(limiter.tracked(), capacity.get());
        // The client that failed once and then went quiet was forgotten: it starts afresh (one
        // failure, not the two that would reach its limit).
        assert_eq!(limiter.fail(quiet, now), Failure::Counted);
        // Addresses within one /64 take one entry, however many there are.
        let limiter = FailureLimiter::new(1_000_000, WINDOW, capacity);
        for i in 0..5_000u64 {
            let address = Ipv6Addr::from((0x2001_0db8_u128 << 96) | u128::from(i));
            limiter.fail(IpAddr::V6(address), now);
        }
        assert_eq!(limiter.tracked(), 1);
    }
}

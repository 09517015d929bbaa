//! The Cloudflare API request budget of one publisher.
//!
//! Cloudflare allows 1,200 API requests per five minutes per user (cumulative over every
//! endpoint) and, past that, answers *every* call with 429 for the next five minutes. So every
//! request the publisher makes (writes, read-backs, reconciliation reads) first takes a token
//! from this budget:
//!
//! * A token bucket of `burst` tokens refilled at `(limit - burst) / 300 s`: in any five-minute
//!   window it admits at most `burst` (what the bucket held at the start) plus
//!   `limit - burst` (what it gained during it), so never more than `limit`. Below that it
//!   lets a burst through at once, then paces requests evenly, so a burst of changes never
//!   spends the whole window's allowance in seconds and then stalls for minutes.
//! * The bucket starts empty, when the budget is first used (not when it is made). Cloudflare
//!   counts per token, not per process, and one process at a time publishes (the publisher
//!   lock), but each keeps a budget of its own: `origin sync --full` handing the lock to the
//!   origin that waited for it, a restart, a crash loop. Had each new holder started with a
//!   full burst, every handover would add one to what the holder before had spent (`limit +
//!   burst` in a window, and more with every restart). Starting empty, the holders one after
//!   another admit no more than one bucket would: `burst + rate × t` in any `t`, `limit` in
//!   five minutes. The cost: a process's first request waits `1 / rate` (a third of a second
//!   at the default 1,000), and the whole burst is there only after 33 s of quiet.
//! * A 429 pauses every caller until its `Retry-After` (seconds or an HTTP date; five minutes
//!   when absent, Cloudflare's penalty) and empties the bucket.
//! * [`ApiBudget::has_spare`] says whether more than half the burst is left: work that can
//!   wait (reconciliation) runs only then, so it never starves writes.
//!
//! Waiting never fails and never spins: a caller sleeps until the next token is due.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

/// Cloudflare's window.
pub const WINDOW: Duration = Duration::from_secs(300);
/// Cloudflare's limit per window (per user / token).
pub use crate::config::CLOUDFLARE_LIMIT;
/// The pause after a 429 that carries no usable `Retry-After`: Cloudflare's whole penalty.
const DEFAULT_PENALTY: Duration = WINDOW;
/// The shortest pause a `Retry-After` can ask for (a date in the past, `0`).
pub const RETRY_AFTER_MIN: Duration = Duration::from_secs(1);
/// The longest pause a `Retry-After` can ask for: twice Cloudflare's five-minute penalty. A
/// larger value (a typo, a proxy's date in 9999) would otherwise stop publishing for years.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(600);

/// [`ApiBudget::acquire`] after [`ApiBudget::close`]: shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// Requests per [`WINDOW`], paced; shared by every request one publisher makes.
#[derive(Debug)]
pub struct ApiBudget {
    /// `None`: unlimited (`wrangler dev`'s local API).
    limit: Option<u32>,
    burst: f64,
    /// Tokens per second.
    rate: f64,
    state: Mutex<State>,
    rate_limited: AtomicU64,
    waits: AtomicU64,
    sent_total: AtomicU64,
    /// Set at shutdown: waiting callers give up (their request is not sent).
    closed: AtomicBool,
    woken: tokio::sync::Notify,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    /// When `tokens` was last brought up to date; `None` until the budget is first used, when
    /// the bucket starts (empty).
    refilled_at: Option<Instant>,
    throttled_until: Option<Instant>,
    /// Requests sent in the last [`WINDOW`] (for the report; pruned as it is read).
    sent: std::collections::VecDeque<Instant>,
}

/// What `/healthz` and `/metrics` show of the budget.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BudgetReport {
    /// Requests allowed per five minutes (`null`: unlimited).
    pub limit: Option<u32>,
    /// Requests sent in the last five minutes.
    pub used: u64,
    /// `limit - used` (`null`: unlimited).
    pub remaining: Option<u64>,
    /// Whether a 429 paused every request, still now.
    pub throttled: bool,
    /// Seconds left of that pause (0 when not throttled).
    pub retry_after_s: u64,
    /// 429 answers seen since start.
    pub rate_limited_total: u64,
    /// Requests that had to wait for the budget since start.
    pub waits_total: u64,
    /// Requests sent since start.
    pub requests_total: u64,
}

impl ApiBudget {
    /// A budget of `limit` requests per five minutes (`None`: unlimited). A tenth of the limit
    /// may go at once; the rest is paced. The bucket starts empty when the budget is first used
    /// (see the module's documentation).
    pub fn new(limit: Option<u32>) -> Self {
        let (burst, rate) = match limit {
            Some(limit) => {
                let limit = f64::from(limit.max(2));
                let burst = (limit / 10.0).floor().max(1.0);
                (burst, (limit - burst) / WINDOW.as_secs_f64())
            }
            None => (0.0, 0.0),
        };
        Self {
            limit,
            burst,
            rate,
            state: Mutex::new(State {
                tokens: 0.0,
                refilled_at: None,
                throttled_until: None,
                sent: std::collections::VecDeque::new(),
            }),
            rate_limited: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            sent_total: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            woken: tokio::sync::Notify::new(),
        }
    }

    /// Takes one request's token, waiting (asleep) while the budget is spent or a 429's pause
    /// lasts. `Err` only once [`Self::close`]d (shutdown): then the request must not be sent.
    pub async fn acquire(&self) -> Result<(), Closed> {
        let mut waited = false;
        loop {
            let woken = self.woken.notified();
            if self.closed.load(Ordering::Acquire) {
                return Err(Closed);
            }
            let Some(wait) = self.take(Instant::now(), 0.0) else {
                return Ok(());
            };
            if !waited {
                waited = true;
                self.waits.fetch_add(1, Ordering::Relaxed);
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = woken => {}
            }
        }
    }

    /// Shutdown: every waiting and later [`Self::acquire`] gives up at once, so a 429's pause
    /// of minutes does not hold the process.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.woken.notify_waiters();
    }

    /// Whether a request now would leave at least half the burst and no pause lasts: work
    /// that can be put off (reconciliation) runs only then, and takes its token as any other
    /// request does. `false`: try again later.
    pub fn has_spare(&self) -> bool {
        self.has_spare_at(Instant::now())
    }

    fn has_spare_at(&self, now: Instant) -> bool {
        self.take_at(now, self.burst / 2.0, false).is_none()
    }

    /// Takes a token if `reserve` more are left; otherwise how long until one may be.
    fn take(&self, now: Instant, reserve: f64) -> Option<Duration> {
        self.take_at(now, reserve, true)
    }

    /// [`Self::take`], or only the check when `spend` is false.
    fn take_at(&self, now: Instant, reserve: f64, spend: bool) -> Option<Duration> {
        let mut state = self.lock();
        if let Some(until) = state.throttled_until {
            if now < until {
                return Some(until - now);
            }
            state.throttled_until = None;
        }
        if self.limit.is_none() {
            if spend {
                state.record(now);
                self.sent_total.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        }
        // First use: the bucket starts now, empty.
        let refilled_at = *state.refilled_at.get_or_insert(now);
        let elapsed = now.saturating_duration_since(refilled_at);
        state.tokens = (state.tokens + elapsed.as_secs_f64() * self.rate).min(self.burst);
        state.refilled_at = Some(now.max(refilled_at));
        if state.tokens >= 1.0 + reserve {
            if spend {
                state.tokens -= 1.0;
                state.record(now);
                self.sent_total.fetch_add(1, Ordering::Relaxed);
            }
            None
        } else {
            let missing = 1.0 + reserve - state.tokens;
            // A millisecond more, so that the token is whole when the caller comes back.
            Some(Duration::from_secs_f64(missing / self.rate) + Duration::from_millis(1))
        }
    }

    /// A 429: every caller waits until `retry_after` has passed (Cloudflare's five minutes
    /// when the answer named none), and the bucket starts empty after it. The pause, as
    /// clamped.
    pub fn throttled(&self, retry_after: Option<Duration>) -> Duration {
        self.throttled_at(Instant::now(), retry_after)
    }

    fn throttled_at(&self, now: Instant, retry_after: Option<Duration>) -> Duration {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
        let pause = retry_after
            .unwrap_or(DEFAULT_PENALTY)
            .clamp(RETRY_AFTER_MIN, RETRY_AFTER_MAX);
        // `Instant + Duration` panics on overflow; the clamp makes that moot, but be sure.
        let until = now
            .checked_add(pause)
            .or_else(|| now.checked_add(DEFAULT_PENALTY))
            .unwrap_or(now);
        let mut state = self.lock();
        state.throttled_until = Some(state.throttled_until.map_or(until, |u| u.max(until)));
        state.tokens = 0.0;
        state.refilled_at = Some(until);
        pause
    }

    /// The figures for `/healthz` and `/metrics`.
    pub fn report(&self) -> BudgetReport {
        let now = Instant::now();
        let mut state = self.lock();
        state.prune(now);
        let used = u64::try_from(state.sent.len()).unwrap_or(u64::MAX);
        let left = state
            .throttled_until
            .filter(|until| *until > now)
            .map(|until| until - now);
        BudgetReport {
            limit: self.limit,
            used,
            remaining: self.limit.map(|l| u64::from(l).saturating_sub(used)),
            throttled: left.is_some(),
            retry_after_s: left.map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0)),
            rate_limited_total: self.rate_limited.load(Ordering::Relaxed),
            waits_total: self.waits.load(Ordering::Relaxed),
            requests_total: self.sent_total.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn record(&mut self, now: Instant) {
        self.prune(now);
        self.sent.push_back(now);
    }

    fn prune(&mut self, now: Instant) {
        while self
            .sent
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= WINDOW)
        {
            self.sent.pop_front();
        }
    }
}

/// A `Retry-After` header's value: delay-seconds, or an HTTP date (`Sun, 06 Nov 1994 08:49:37
/// GMT`) read against `now`, clamped to [`RETRY_AFTER_MIN`] ..= [`RETRY_AFTER_MAX`] (a date in
/// the past asks for the minimum). `None` when it is neither (then the default penalty holds).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let pause = if let Ok(seconds) = value.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let format = time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        let at = time::PrimitiveDateTime::parse(value, format)
            .ok()?
            .assume_utc();
        // A date before 1970 is in the past: the minimum pause.
        let seconds = u64::try_from(at.unix_timestamp()).unwrap_or(0);
        SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(seconds))
            .map_or(RETRY_AFTER_MAX, |at| {
                at.duration_since(now).unwrap_or(Duration::ZERO)
            })
    };
    Some(pause.clamp(RETRY_AFTER_MIN, RETRY_AFTER_MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes tokens as fast as allowed over `seconds`, at 10 ms steps; the instants admitted.
    fn drain(budget: &ApiBudget, start: Instant, seconds: u64) -> Vec<Instant> {
        let mut admitted = Vec::new();
        let mut t = start;
        while t < start + Duration::from_secs(seconds) {
            while budget.take(t, 0.0).is_none() {
                admitted.push(t);
            }
            t += Duration::from_millis(10);
        }
        admitted
    }

    /// The most requests of `admitted` (in order) in any five-minute window.
    fn busiest_window(admitted: &[Instant]) -> usize {
        (0..admitted.len())
            .map(|i| {
                admitted[i..]
                    .iter()
                    .take_while(|t| t.duration_since(admitted[i]) < WINDOW)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn no_five_minute_window_holds_more_than_the_limit() {
        let budget = ApiBudget::new(Some(1000));
        let start = Instant::now();
        let admitted = drain(&budget, start, 1200);
        let busiest = busiest_window(&admitted);
        assert!(busiest <= 1000, "{busiest} requests in a window");
        // The bucket starts empty: paced from the first request.
        let first_second = admitted
            .iter()
            .filter(|t| t.duration_since(start) < Duration::from_secs(1))
            .count();
        assert!((2..=3).contains(&first_second), "{first_second}");
        let per_window = admitted
            .iter()
            .filter(|t| t.duration_since(start) >= Duration::from_secs(600))
            .filter(|t| t.duration_since(start) < Duration::from_secs(900))
            .count();
        assert!((890..=900).contains(&per_window), "{per_window}");
        // After a quiet spell a burst goes at once, then requests are paced, not spent and
        // then stalled.
        let quiet = start + Duration::from_secs(1300);
        let burst = drain(&budget, quiet, 1)
            .iter()
            .filter(|t| **t == quiet)
            .count();
        assert_eq!(burst, 100);
    }

    /// A process that takes over (the origin that waited for `origin sync --full`'s lock, a
    /// restart) adds no burst of its own to what the one before it spent: together they stay
    /// within one budget. Its budget was made long before (origin makes it at start, then
    /// waits for the lock): the bucket starts when it is first used.
    #[test]
    fn a_process_taking_over_stays_within_one_budget_with_the_one_before() {
        let start = Instant::now();
        let before = ApiBudget::new(Some(1000));
        let after = ApiBudget::new(Some(1000));
        let mut admitted = drain(&before, start, 200);
        let handover = start + Duration::from_secs(200);
        admitted.extend(drain(&after, handover, 300));
        let busiest = busiest_window(&admitted);
        assert!(busiest <= 1000, "{busiest} requests in a window");
        let at_once = admitted.iter().filter(|t| **t == handover).count();
        assert!(at_once <= 1, "{at_once} requests at the handover");
    }

    #[test]
    fn a_429_pauses_everyone_until_retry_after_and_defaults_to_five_minutes() {
        let budget = ApiBudget::new(Some(1000));
        let now = Instant::now();
        budget.throttled_at(now, Some(Duration::from_secs(7)));
        let wait = budget.take(now, 0.0).expect("paused");
        assert_eq!(wait, Duration::from_secs(7));
        let later = now + Duration::from_secs(7);
        // After the pause the bucket starts empty: the next token comes at the paced rate.
        let wait = budget.take(later, 0.0).expect("bucket empty");
        assert!(wait <= Duration::from_millis(400), "{wait:?}");
        assert!(budget.take(later + wait, 0.0).is_none());
        let report = budget.report();
        assert_eq!(report.rate_limited_total, 1);

        let silent = ApiBudget::new(Some(1000));
        silent.throttled_at(now, None);
        assert_eq!(silent.take(now, 0.0), Some(WINDOW));
        assert!(silent.report().throttled);
    }

    #[test]
    fn spare_tokens_leave_half_the_burst_for_writes() {
        let budget = ApiBudget::new(Some(1000));
        let start = Instant::now();
        assert!(!budget.has_spare_at(start), "the bucket starts empty");
        // Full after 34 s.
        let full = start + Duration::from_secs(34);
        let mut spare = 0;
        while budget.has_spare_at(full) {
            assert!(budget.take(full, 0.0).is_none());
            spare += 1;
        }
        assert_eq!(spare, 50);
        let mut writes = 0;
        while budget.take(full, 0.0).is_none() {
            writes += 1;
        }
        assert_eq!(writes, 50);
    }

    #[test]
    fn unlimited_never_waits_but_counts() {
        let budget = ApiBudget::new(None);
        let now = Instant::now();
        for _ in 0..5000 {
            assert!(budget.take(now, 0.0).is_none());
        }
        let report = budget.report();
        assert_eq!(
            (report.limit, report.used, report.remaining),
            (None, 5000, None)
        );
    }

    #[tokio::test]
    async fn closing_releases_a_caller_waiting_out_a_429() {
        let budget = std::sync::Arc::new(ApiBudget::new(Some(1000)));
        budget.throttled(None);
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.acquire().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        budget.close();
        let result = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released at once")
            .expect("joined");
        assert_eq!(result, Err(Closed));
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // 06 Nov 1994 08:49:37
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:51:37 GMT", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    /// A hostile or broken `Retry-After` neither panics nor pauses publishing for years: the
    /// pause is clamped to 1 s ..= 600 s, and nonsense means the default penalty.
    #[test]
    fn retry_after_is_clamped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // 06 Nov 1994 08:49:37
        let cases = [
            ("18446744073709551615", Some(RETRY_AFTER_MAX)),
            ("1000000000", Some(RETRY_AFTER_MAX)),
            ("601", Some(RETRY_AFTER_MAX)),
            ("600", Some(Duration::from_secs(600))),
            ("0", Some(RETRY_AFTER_MIN)),
            ("-1", None),
            ("abc", None),
            ("", None),
            ("Fri, 31 Dec 9999 23:59:59 GMT", Some(RETRY_AFTER_MAX)),
            ("Sun, 06 Nov 1994 08:00:00 GMT", Some(RETRY_AFTER_MIN)),
            ("Thu, 01 Jan 1970 00:00:00 GMT", Some(RETRY_AFTER_MIN)),
        ];
        for (value, expected) in cases {
            assert_eq!(parse_retry_after(value, now), expected, "{value:?}");
        }
        // Whatever reaches the budget (even unclamped), the pause stays within the bounds and
        // nothing panics.
        for retry_after in [
            Some(Duration::from_secs(u64::MAX)),
            Some(Duration::MAX),
            Some(Duration::ZERO),
            None,
        ] {
            let budget = ApiBudget::new(Some(1000));
            let at = Instant::now();
            budget.throttled_at(at, retry_after);
            let wait = budget.take(at, 0.0).expect("paused");
            assert!(
                (RETRY_AFTER_MIN..=RETRY_AFTER_MAX).contains(&wait),
                "{retry_after:?}: {wait:?}"
            );
        }
    }
}

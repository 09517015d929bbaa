//! Times read from other clocks (the ledger object's, origin's) and from this isolate's clock
//! before it stepped, judged against this isolate's clock now (sans-IO: `now` is a parameter).
//!
//! Every clock involved can step: NTP correcting a clock that ran ahead, a machine's clock set by
//! hand, a fault. The rules, used by [`super::Memory`] for every time it keeps:
//!
//! * **A time more than [`TOLERANCE_MS`] after `now` is from the future** ([`age`] is `None`): it
//!   proves nothing, so it is never fresh, and a stored time that is now in the future (this
//!   isolate's clock stepped back since) is forgotten rather than kept as a maximum, so that it
//!   never blocks later, correct times.
//! * **A time up to [`TOLERANCE_MS`] ahead counts as `now`**: clocks kept by NTP differ by a few
//!   milliseconds, and a request's `now` is read once, before other tasks of the isolate apply
//!   newer answers.
//! * **A running maximum ([`Newest`]) counts a new time from when it arrived at the latest**, and
//!   once only: the same value read again later (a shared copy, a ledger repeating origin's last
//!   watermark) is not newer, and a value once refused as from the future is refused again when
//!   it comes back, however late: it was never a time that clock really had.
//!
//! So memory is distrusted while clocks disagree (the edge falls back to KV, or denies when
//! strict), and trusted again on the first answer after they agree.
//!
//! ```
//! use latchkey_shared::UnixMillis;
//! use latchkey_shared::ledger::memory::clock::{Newest, Taken, age};
//!
//! let now = UnixMillis(1_000_000);
//! assert_eq!(age(UnixMillis(999_000), now), Some(1000));
//! assert_eq!(age(UnixMillis(1_000_500), now), Some(0), "within the tolerance");
//! assert_eq!(age(UnixMillis(1_060_000), now), None, "from the future");
//!
//! let mut watermark = Newest::default();
//! assert_eq!(watermark.take(UnixMillis(1_060_000), now), Taken::FromTheFuture);
//! assert_eq!(watermark.take(UnixMillis(999_000), now), Taken::Newer);
//! assert_eq!(watermark.age(now), Some(1000));
//! // A minute later the same future value is refused again.
//! assert_eq!(watermark.take(UnixMillis(1_060_000), UnixMillis(1_060_000)), Taken::FromTheFuture);
//! ```

use crate::record::UnixMillis;

/// How far ahead of this isolate's clock a time may be and still count (as `now`, so it
/// lengthens no trust window): a second, well above the skew of clocks kept by NTP and the
/// staleness of a request's reading of the clock, well below the default trust windows (2 s
/// and 3 s).
pub const TOLERANCE_MS: i64 = 1000;

/// How long before `now` the time `at` was: `Some(0)` for a time up to [`TOLERANCE_MS`] ahead,
/// `None` for one further ahead (from the future: no age can be told). Never overflows, whatever
/// the two values.
pub fn age(at: UnixMillis, now: UnixMillis) -> Option<i64> {
    let age = now.0.saturating_sub(at.0);
    (age >= -TOLERANCE_MS).then_some(age.max(0))
}

/// What [`Newest::take`] did with a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Later than every time taken before: it is the newest now.
    Newer,
    /// Not later than a time taken before: nothing changed.
    NotNewer,
    /// More than [`TOLERANCE_MS`] ahead of `now`, or a value refused so before: refused.
    FromTheFuture,
}

/// The running maximum of a time read from another clock (see the module docs): the newest
/// value taken as it was read ([`Self::seen`], to order answers by), and the time it counts
/// from ([`Self::age`]: when it arrived, at the latest).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Newest {
    seen: Option<UnixMillis>,
    counted: Option<UnixMillis>,
    refused: Option<UnixMillis>,
}

impl Newest {
    /// Takes `value`, read at `now`.
    pub fn take(&mut self, value: UnixMillis, now: UnixMillis) -> Taken {
        self.forget_future(now);
        if age(value, now).is_none() {
            self.refused = Some(value);
            return Taken::FromTheFuture;
        }
        if self.refused == Some(value) {
            return Taken::FromTheFuture;
        }
        if self.seen.is_some_and(|seen| value <= seen) {
            return Taken::NotNewer;
        }
        self.seen = Some(value);
        self.counted = self.counted.max(Some(UnixMillis(value.0.min(now.0))));
        Taken::Newer
    }

    /// The newest value taken, as it was read, unless it is from the future at `now`.
    pub fn seen(&self, now: UnixMillis) -> Option<UnixMillis> {
        self.seen.filter(|&seen| age(seen, now).is_some())
    }

    /// How old the newest value is at `now`, counted from when it arrived at the latest; `None`
    /// if nothing was taken, or this clock has since gone back past it.
    pub fn age(&self, now: UnixMillis) -> Option<i64> {
        self.counted.and_then(|counted| age(counted, now))
    }

    /// Whether the newest value is at most `max_ms` old at `now` ([`Self::age`]).
    pub fn fresh(&self, max_ms: i64, now: UnixMillis) -> bool {
        self.age(now).is_some_and(|age| age <= max_ms)
    }

    /// Forgets everything taken (not what was refused).
    pub fn clear(&mut self) {
        self.seen = None;
        self.counted = None;
    }

    /// Forgets values that are from the future at `now` (this clock went back past them), so
    /// that they block no later, correct value.
    fn forget_future(&mut self, now: UnixMillis) {
        if self.seen.is_some_and(|seen| age(seen, now).is_none()) {
            self.seen = None;
        }
        if self
            .counted
            .is_some_and(|counted| age(counted, now).is_none())
        {
            self.counted = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_tolerate_a_little_skew_and_no_more() {
        let now = 1_000_000;
        // (time, expected age)
        let cases = [
            (now, Some(0)),
            (now - 2500, Some(2500)),
            (now + 1, Some(0)),
            (now + TOLERANCE_MS, Some(0)),
            (now + TOLERANCE_MS + 1, None),
            (now + 3_600_000, None),
            (i64::MAX, None),
            (i64::MIN, Some(i64::MAX)),
        ];
        for (at, expected) in cases {
            assert_eq!(age(UnixMillis(at), UnixMillis(now)), expected, "{at}");
        }
        assert_eq!(age(UnixMillis(i64::MAX), UnixMillis(i64::MIN)), None);
        assert_eq!(age(UnixMillis(0), UnixMillis(i64::MIN)), None);
    }

    #[test]
    fn the_newest_time_is_never_one_from_the_future() {
        let t = 1_000_000;
        // Steps: (value, isolate's clock, what take says, then seen and age at that clock)
        type Step = (i64, i64, Taken, Option<i64>, Option<i64>);
        let cases: [(&str, &[Step]); 7] = [
            (
                "values in order",
                &[
                    (t, t, Taken::Newer, Some(t), Some(0)),
                    (t + 1000, t + 1500, Taken::Newer, Some(t + 1000), Some(500)),
                    (
                        t + 500,
                        t + 2000,
                        Taken::NotNewer,
                        Some(t + 1000),
                        Some(1000),
                    ),
                    (
                        t + 1000,
                        t + 2000,
                        Taken::NotNewer,
                        Some(t + 1000),
                        Some(1000),
                    ),
                ],
            ),
            (
                "a value slightly ahead counts from when it arrived, once",
                &[
                    (t + 500, t, Taken::Newer, Some(t + 500), Some(0)),
                    (
                        t + 500,
                        t + 3000,
                        Taken::NotNewer,
                        Some(t + 500),
                        Some(3000),
                    ),
                ],
            ),
            (
                "a value from the future is refused, and the older one stays",
                &[
                    (t, t, Taken::Newer, Some(t), Some(0)),
                    (
                        t + 3_600_000,
                        t + 1000,
                        Taken::FromTheFuture,
                        Some(t),
                        Some(1000),
                    ),
                    (t + 1500, t + 2000, Taken::Newer, Some(t + 1500), Some(500)),
                ],
            ),
            (
                "the same future value, once it is no longer ahead, is still refused",
                &[
                    (t + 10_000, t, Taken::FromTheFuture, None, None),
                    (t + 10_000, t + 9500, Taken::FromTheFuture, None, None),
                    (t + 10_000, t + 12_000, Taken::FromTheFuture, None, None),
                    (
                        t + 12_000,
                        t + 12_000,
                        Taken::Newer,
                        Some(t + 12_000),
                        Some(0),
                    ),
                ],
            ),
            (
                "this clock steps back an hour: what was taken before is forgotten",
                &[
                    (t, t, Taken::Newer, Some(t), Some(0)),
                    (
                        t - 3_599_000,
                        t - 3_599_000,
                        Taken::Newer,
                        Some(t - 3_599_000),
                        Some(0),
                    ),
                    (
                        t - 3_598_000,
                        t - 3_598_000,
                        Taken::Newer,
                        Some(t - 3_598_000),
                        Some(0),
                    ),
                ],
            ),
            (
                "this clock steps forward an hour, then back",
                &[
                    (t, t, Taken::Newer, Some(t), Some(0)),
                    (
                        t + 1000,
                        t + 3_601_000,
                        Taken::Newer,
                        Some(t + 1000),
                        Some(3_600_000),
                    ),
                    (t + 2000, t + 2000, Taken::Newer, Some(t + 2000), Some(0)),
                ],
            ),
            (
                "extreme values neither overflow nor count",
                &[
                    (i64::MAX, t, Taken::FromTheFuture, None, None),
                    (i64::MIN, t, Taken::Newer, Some(i64::MIN), Some(i64::MAX)),
                    (t, t, Taken::Newer, Some(t), Some(0)),
                ],
            ),
        ];
        for (what, steps) in cases {
            let mut newest = Newest::default();
            for (i, &(value, now, taken, seen, age)) in steps.iter().enumerate() {
                let now = UnixMillis(now);
                assert_eq!(
                    newest.take(UnixMillis(value), now),
                    taken,
                    "{what}, step {i}"
                );
                assert_eq!(
                    newest.seen(now).map(|s| s.0),
                    seen,
                    "{what}, step {i}: seen"
                );
                assert_eq!(newest.age(now), age, "{what}, step {i}: age");
            }
        }
    }
}

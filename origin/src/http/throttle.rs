//! Log lines that anyone can cause (an unsigned caller of an open route) are throttled: at
//! most one line per kind of event every [`LogThrottle::EVERY`], carrying how many such events
//! were not logged since the last line. A flood then costs a line every ten seconds, not a line
//! a request.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One kind of event's throttle.
#[derive(Debug)]
pub struct LogThrottle {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    last_line: Option<Instant>,
    unlogged: u64,
}

impl LogThrottle {
    /// The least time between two lines of one kind.
    pub const EVERY: Duration = Duration::from_secs(10);

    /// A throttle that lets the first event through.
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(State {
                last_line: None,
                unlogged: 0,
            }),
        }
    }

    /// Counts an event at `now`; `Some(n)` when it is to be logged, `n` being the events left
    /// out since the last line.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state
            .last_line
            .is_some_and(|at| now.saturating_duration_since(at) < Self::EVERY)
        {
            state.unlogged = state.unlogged.saturating_add(1);
            return None;
        }
        state.last_line = Some(now);
        Some(std::mem::take(&mut state.unlogged))
    }
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let throttle = LogThrottle::new();
        let t0 = Instant::now();
        assert_eq!(throttle.allow(t0), Some(0), "the first event is logged");
        for n in 1..=5 {
            assert_eq!(throttle.allow(t0 + Duration::from_secs(n)), None);
        }
        assert_eq!(
            throttle.allow(t0 + LogThrottle::EVERY),
            Some(5),
            "the next line says how many were left out"
        );
        assert_eq!(throttle.allow(t0 + LogThrottle::EVERY), None);
    }
}

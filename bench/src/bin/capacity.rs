//! The ledger's capacity model: how many requests per second the one ledger Durable Object gets,
//! and what it costs a month, against the number of Cloudflare locations serving traffic, active
//! isolates per location and the poll interval, with and without the Cache API sharing polls.
//! `cargo run -p latchkey-bench --bin ledger-capacity` prints the table README.md quotes.
//!
//! The model (edge/src/memory.rs):
//! * An isolate polls only while it serves requests, at most once per poll interval.
//! * Without the Cache API (`*.workers.dev`, or `LEDGER_SHARE_POLLS=false`), every active isolate
//!   asks the ledger itself: `locations × isolates / interval` requests per second.
//! * With it (a custom domain), the isolates of a location share one answer per interval; a few
//!   may miss the cache together at the start of an interval, counted here as
//!   [`SHARED_RACE`] requests per location per interval.
//! * Origin appends about once a second (its watermark, with any changes).
//!
//! Cloudflare's published figures (Durable Objects pricing and limits, Workers Paid plan, read
//! 2026-11): about 1,000 requests per second per object (a soft limit); 1 million requests a
//! month included, then $0.15 per million; 400,000 GB-s of duration included, then $12.50 per
//! million GB-s, an object billed at 128 MB while it is active (always, at these rates); SQLite
//! rows: 25 billion read and 50 million written a month included.

#![allow(
    clippy::print_stdout,
    reason = "a command-line tool that prints a table"
)]

/// Requests per location per interval when isolates share polls (cache misses racing).
const SHARED_RACE: f64 = 1.5;
/// Origin's appends per second (the watermark).
const ORIGIN_APPENDS_PER_S: f64 = 1.0;
/// One object's soft limit, requests per second.
const OBJECT_LIMIT_RPS: f64 = 1000.0;
const SECONDS_PER_MONTH: f64 = 30.0 * 24.0 * 3600.0;
const INCLUDED_REQUESTS: f64 = 1e6;
const PRICE_PER_MILLION_REQUESTS: f64 = 0.15;
const INCLUDED_GB_S: f64 = 400_000.0;
const PRICE_PER_MILLION_GB_S: f64 = 12.50;
const OBJECT_GB: f64 = 0.128;

/// Ledger requests per second for `locations` × `isolates` active isolates polling every
/// `interval_s`, shared or not.
fn requests_per_s(locations: f64, isolates: f64, interval_s: f64, shared: bool) -> f64 {
    let polls = if shared {
        locations * SHARED_RACE.min(isolates) / interval_s
    } else {
        locations * isolates / interval_s
    };
    polls + ORIGIN_APPENDS_PER_S
}

/// Dollars a month for a ledger taking `rps` requests per second all month.
fn monthly_cost(rps: f64) -> f64 {
    let requests = rps * SECONDS_PER_MONTH;
    let request_cost = (requests - INCLUDED_REQUESTS).max(0.0) / 1e6 * PRICE_PER_MILLION_REQUESTS;
    let gb_s = OBJECT_GB * SECONDS_PER_MONTH;
    let duration_cost = (gb_s - INCLUDED_GB_S).max(0.0) / 1e6 * PRICE_PER_MILLION_GB_S;
    request_cost + duration_cost
}

fn main() {
    println!(
        "Ledger load and monthly cost (one Durable Object; soft limit {OBJECT_LIMIT_RPS:.0} requests/s)"
    );
    println!(
        "{:>9} {:>9} {:>6} | {:>12} {:>7} {:>10} | {:>12} {:>7} {:>10}",
        "locations",
        "isolates",
        "poll",
        "no cache r/s",
        "% limit",
        "$/month",
        "shared r/s",
        "% limit",
        "$/month"
    );
    for locations in [10.0, 50.0, 100.0, 300.0] {
        for isolates in [1.0, 4.0, 16.0] {
            for interval_s in [1.0, 2.0, 5.0] {
                let alone = requests_per_s(locations, isolates, interval_s, false);
                let shared = requests_per_s(locations, isolates, interval_s, true);
                let flag = |rps: f64| if rps > OBJECT_LIMIT_RPS { " over" } else { "" };
                println!(
                    "{locations:>9.0} {isolates:>9.0} {:>5.0}s | {alone:>12.0} {:>6.0}% {:>10.2}{} | {shared:>12.0} {:>6.0}% {:>10.2}{}",
                    interval_s,
                    100.0 * alone / OBJECT_LIMIT_RPS,
                    monthly_cost(alone),
                    flag(alone),
                    100.0 * shared / OBJECT_LIMIT_RPS,
                    monthly_cost(shared),
                    flag(shared),
                );
            }
        }
    }
    println!(
        "\nIsolates poll only while they serve traffic; a cold isolate also reads the ledger's \
         retained entries once, directly (1 request per 1,000 entries)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharing_bounds_load_by_locations_and_costs_follow_requests() {
        // 100 locations, 16 isolates each, 1 s: 1,600 polls alone, 150 shared (+1 for origin).
        assert_eq!(requests_per_s(100.0, 16.0, 1.0, false), 1601.0);
        assert_eq!(requests_per_s(100.0, 16.0, 1.0, true), 151.0);
        // One isolate per location cannot race itself.
        assert_eq!(requests_per_s(10.0, 1.0, 1.0, true), 11.0);
        // Under the included million requests and duration: free.
        assert_eq!(monthly_cost(0.3), 0.0);
        // 1,000 requests/s: 2,592 M requests, 2,591 M billed at $0.15.
        let cost = monthly_cost(1000.0);
        assert!((cost - 388.65).abs() < 0.01, "{cost}");
    }
}

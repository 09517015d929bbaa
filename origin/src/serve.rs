//! `origin serve`: wire configuration, storage, the service and the router, and run until
//! SIGINT or SIGTERM, then flush pending usage and close the database. The KV publisher and the
//! ledger publisher run beside the server; what they have not published stays in the outbox for
//! the next start.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt as _;

use crate::audit::AuditChain;
use crate::config::Config;
use crate::delivery::kv::client::KvClient;
use crate::delivery::kv::publisher::{Publisher, PublisherStatus};
use crate::delivery::ledger::{LedgerClient, LedgerPublisher, LedgerStatus};
use crate::http::client::{TrustedProxies, client_key};
use crate::http::ingest::UsageIngest;
use crate::http::{AppParts, AppState, router};
use crate::leaks::github_keys::GithubKeys;
use crate::service::KeyService;
use crate::store::lease::{Lease, Role};
use crate::store::{self, KeyStore};

/// Runs the service until a shutdown signal.
pub async fn serve(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let checkpoints = config
        .audit_checkpoint_file
        .clone()
        .or_else(|| store::default_checkpoint_path(config.database_url.as_str()));
    match &checkpoints {
        Some(file) => {
            tracing::info!(file = %file.display(), "audit checkpoints are appended to this file and logged")
        }
        None => tracing::warn!(
            "audit checkpoints are only logged (an in-memory SQLite database and no AUDIT_CHECKPOINT_FILE)"
        ),
    }
    let chain = Arc::new(AuditChain::new(config.audit_chain_key.clone(), checkpoints));
    let store = store::open(config.database_url.as_str(), Some(chain)).await?;
    // Held for the whole run: without LEDGER_URL, the ledger lease (see `ledger_off`), watched
    // (a lease can be lost: see `keep_ledger_off`).
    let _ledger_off = match config.ledger {
        Some(_) => None,
        None => ledger_off(store.as_ref())
            .await
            .map(|lease| AbortOnDrop(tokio::spawn(keep_ledger_off(store.clone(), lease)))),
    };
    let durability = store.durability().await?;
    tracing::info!(%durability, "database durability");
    // The publishers and deliverers read through connections of their own.
    let background = store.for_background();
    let service = Arc::new(KeyService::new(
        store.clone(),
        config.key_prefix.clone(),
        config.scope_policy.clone(),
    ));
    let publisher_status = Arc::new(PublisherStatus::new(config.kv.is_some()));
    let ledger_status = Arc::new(LedgerStatus::new(config.ledger.is_some()));
    let webhook_status = Arc::new(crate::delivery::webhooks::WebhookStatus::new(
        config
            .webhooks
            .as_ref()
            .map_or(&[][..], |w| w.endpoints.as_slice()),
    ));
    let github = if config.github_keys.any() {
        let keys = Arc::new(GithubKeys::load(config.github_keys.clone())?);
        tokio::spawn(keys.clone().keep_fresh());
        tracing::info!(
            keys = keys.count(),
            "GitHub secret scanning alerts are taken at POST /v1/secret_scanning/github"
        );
        Some(keys)
    } else {
        None
    };
    let state = AppState::from(AppParts {
        service: service.clone(),
        admin_tokens: config.admin_tokens.clone().into(),
        publisher: publisher_status.clone(),
        ledger: ledger_status.clone(),
        usage_ingest: config
            .usage_secret
            .clone()
            .map(|secret| Arc::new(UsageIngest::new(secret))),
        admin_auth_failures_per_minute: config.admin_auth_failures_per_minute,
        trusted_proxies: config.trusted_proxies.clone(),
        request_read_timeout: config.request_read_timeout,
        github: github.clone(),
        leak_action: config.leak_action,
        webhooks: webhook_status.clone(),
        open_figures: crate::http::health::OpenFigures::default(),
        stale_policy_usage_max_age: config
            .key_policy
            .stale_after
            .map(|_| config.key_policy.usage_max_age),
    });
    if state.usage_ingest.is_none() {
        tracing::info!("USAGE_SIGNING_SECRET is unset: POST /v1/usage (edge usage reports) is off");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let publisher = match &config.kv {
        Some(kv) => {
            let publisher =
                Publisher::new(background.clone(), KvClient::new(kv)?, publisher_status, kv);
            tracing::info!(kv_api_base = %kv.api_base, namespace = %kv.namespace_id, "publishing key records to Workers KV");
            Some(tokio::spawn(
                publisher.run(service.committed(), stop_rx.clone()),
            ))
        }
        None => {
            tracing::warn!(
                "KV_API_BASE and KV_NAMESPACE_ID are unset: KV publishing is OFF; changes wait in \
                 the outbox and the edge will not see them until publishing is configured"
            );
            None
        }
    };
    let ledger = match &config.ledger {
        Some(ledger) => {
            let publisher = LedgerPublisher::new(
                background.clone(),
                LedgerClient::new(ledger)?,
                ledger_status,
                ledger,
            );
            tracing::info!(
                watermark_ms =
                    u64::try_from(ledger.watermark_every.as_millis()).unwrap_or(u64::MAX),
                "appending key changes and watermarks to the edge's change ledger"
            );
            Some(tokio::spawn(
                publisher.run(service.ledger_committed(), stop_rx.clone()),
            ))
        }
        None => {
            tracing::info!(
                "LEDGER_URL is unset: the edge's change ledger is not fed (revocations reach the \
                 edge through KV alone)"
            );
            None
        }
    };
    let webhooks = match &config.webhooks {
        Some(webhooks) => {
            // Before the first request: a change made before a new endpoint's cursor exists
            // would be taken for history. A busy database gets a few tries; one that takes no
            // write (read-only) takes no change either, and the deliverers make the cursors
            // once it does.
            for attempt in 1..=5 {
                match crate::delivery::webhooks::init_cursors(webhooks, store.as_ref()).await {
                    Ok(()) => break,
                    Err(error) if attempt == 5 => tracing::warn!(
                        %error,
                        "webhooks: cannot record the new endpoints' cursors yet"
                    ),
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
            tracing::info!(
                endpoints = webhooks.endpoints.len(),
                "delivering key events to webhook endpoints"
            );
            Some(tokio::spawn(crate::delivery::webhooks::run(
                webhooks.clone(),
                background.clone(),
                webhook_status,
                service.subscribe_commits(),
                stop_rx.clone(),
            )))
        }
        None => {
            tracing::info!("WEBHOOK_URLS is unset: event webhooks are off");
            None
        }
    };
    let policy = if config.key_policy.any() {
        tracing::info!(policy = ?config.key_policy, "key lifecycle policies are on");
        Some(tokio::spawn(crate::jobs::policy::run(
            service.clone(),
            config.key_policy.clone(),
            stop_rx.clone(),
        )))
    } else {
        None
    };
    let flusher = tokio::spawn(flush_usage_periodically(
        service.clone(),
        config.last_used_flush,
        stop_rx,
    ));

    let listener = TcpListener::bind(config.listen).await?;
    tracing::info!(
        listen = %listener.local_addr()?,
        database = %config.database_url.redacted(),
        admin_tokens = ?config.admin_tokens,
        "origin listening"
    );
    let limits = ConnectionLimits::new(
        config.max_connections,
        config.max_connections_per_address,
        config.trusted_proxies.clone(),
    );
    serve_http(listener, router(state), config.request_read_timeout, limits).await;

    tracing::info!("shutting down: flushing last_used_at");
    let _ = stop_tx.send(true);
    let _ = flusher.await;
    if let Some(publisher) = publisher {
        let _ = publisher.await;
    }
    if let Some(ledger) = ledger {
        let _ = ledger.await;
    }
    if let Some(webhooks) = webhooks {
        let _ = webhooks.await;
    }
    if let Some(policy) = policy {
        let _ = policy.await;
    }
    if let Err(error) = service.flush_usage().await {
        tracing::error!(%error, "final last_used_at flush failed");
    }
    store.close().await;
    Ok(())
}

/// Without `LEDGER_URL` nobody clears the outbox rows' ledger flags, so KV's acknowledgement
/// should clear them too, and the flags an earlier run left should be released. But another
/// origin over the same database may feed the ledger: clearing its flags would let it send
/// watermarks over rows the ledger never got, and isolates would trust memory that misses
/// revocations. So the ledger is switched off only while this process holds the ledger lock
/// (the ledger publisher's lease: `<database>.ledger.lock`, or an advisory lock on PostgreSQL):
/// the lease is returned, to be kept (and watched: `keep_ledger_off`) for the
/// whole run. If another process holds it, ledger flags are left alone (KV's acknowledgement
/// clears only KV's), and a warning says so.
async fn ledger_off(store: &dyn KeyStore) -> Option<Lease> {
    let lock = match store.try_lease(Role::Ledger).await {
        Ok(Some(lease)) => lease,
        Ok(None) => {
            tracing::warn!(
                "LEDGER_URL is unset but another origin over this database holds the ledger \
                 lock (it feeds the change ledger): outbox rows are left for its ledger \
                 publisher, and KV acknowledgements here clear only KV's need"
            );
            return None;
        }
        Err(error) => {
            tracing::warn!(
                %error,
                "LEDGER_URL is unset but the ledger lock cannot be taken: outbox rows are \
                 left for the change ledger (another origin may feed it)"
            );
            return None;
        }
    };
    match store.set_ledger_sink(false).await {
        Ok(0) => {}
        Ok(released) => tracing::info!(
            rows = released,
            "LEDGER_URL is unset: outbox rows left for the change ledger by an earlier run are released"
        ),
        // Harmless (a read-only database, say): they wait for a start that can write, or for
        // their key's next change, whose KV acknowledgement releases them too.
        Err(error) => tracing::warn!(
            %error,
            "cannot release the outbox rows left for the change ledger; they stay until a later start"
        ),
    }
    Some(lock)
}

/// While this process holds the ledger lease with the ledger off: once the lease is lost
/// (PostgreSQL ended its connection), another origin may feed the ledger, so the ledger sink is
/// switched back on (KV's acknowledgements stop clearing ledger flags) until the lease is this
/// process's again.
async fn keep_ledger_off(store: Arc<dyn KeyStore>, mut lease: Lease) {
    let (_never, mut stop) = watch::channel(false);
    loop {
        lease.lost_wait().await;
        crate::store::lease::lost_lease(Role::Ledger);
        if let Err(error) = store.set_ledger_sink(true).await {
            tracing::error!(%error, "cannot switch the ledger sink back on");
        }
        lease = match store
            .hold_lease(
                Role::Ledger,
                &mut stop,
                "another origin holds the ledger lock (it feeds the change ledger); waiting",
            )
            .await
        {
            Ok(lease) => lease,
            Err(_) => return,
        };
        if let Err(error) = store.set_ledger_sink(false).await {
            tracing::warn!(%error, "cannot release the outbox rows left for the change ledger");
        }
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves HTTP/1.1 on `listener` until a shutdown signal, then lets requests in flight finish
/// (for at most [`DRAIN_LIMIT`]).
///
/// Not `axum::serve`: it sets no timer, so hyper's header read timeout never fires and a client
/// sending its headers a byte a minute would hold its connection for ever. Here headers must
/// arrive within `read_timeout` (the body's own limit is in the JSON extractor), and each
/// request carries its peer address for the admin failure limit.
///
/// A connection over `limits` (all open connections, or those of its client address) is closed
/// at once, before a byte is read: it holds nothing, and the client sees the connection closed
/// (or reset, if its request had already arrived), as from a server at capacity. Which cap bit
/// is logged at `warn`, at most once per [`REFUSAL_LOG_EVERY`] per cap, with how many
/// connections were refused since the last line.
async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    read_timeout: Duration,
    limits: ConnectionLimits,
) {
    let limits = Arc::new(limits);
    let mut refusals = RefusalLog::default();
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let slot = match limits.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(cap) => {
                drop(stream);
                refusals.refused(cap, peer, &limits, Instant::now());
                continue;
            }
        };
        let service = app.clone().map_request(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            req.map(Body::new)
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(read_timeout)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN_LIMIT) => {
            tracing::warn!("requests still running after {DRAIN_LIMIT:?}; stopping anyway");
        }
    }
}

/// Longest wait for requests in flight at shutdown.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Caps on open connections (`MAX_CONNECTIONS`, `MAX_CONNECTIONS_PER_ADDRESS`). Only clients
/// with open connections are tracked, so the table holds at most `max` entries; admitting and
/// releasing are O(1) under one short lock.
struct ConnectionLimits {
    max: usize,
    per_address: usize,
    proxies: TrustedProxies,
    open: Mutex<OpenConnections>,
}

#[derive(Default)]
struct OpenConnections {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cap {
    Total,
    PerAddress,
}

impl ConnectionLimits {
    fn new(max: usize, per_address: usize, proxies: TrustedProxies) -> Self {
        Self {
            max,
            per_address,
            proxies,
            open: Mutex::default(),
        }
    }

    /// Admits a connection from `peer`, or names the cap it is over. A trusted proxy carries
    /// many clients' connections, so only the total cap applies to it.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<ConnectionSlot, Cap> {
        let client = (!self.proxies.contains(peer)).then(|| client_key(peer));
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.total >= self.max {
            return Err(Cap::Total);
        }
        if let Some(client) = client {
            let held = open.by_client.get(&client).copied().unwrap_or(0);
            if held >= self.per_address {
                return Err(Cap::PerAddress);
            }
            // The last eighth of the total is kept for clients holding few connections (an
            // admin, the edge's usage reports, GitHub's alerts): a few busy addresses cannot
            // fill it.
            if open.total >= self.max - self.max / RESERVED_PART && held >= RESERVE_PER_CLIENT {
                return Err(Cap::Total);
            }
            *open.by_client.entry(client).or_insert(0) += 1;
        }
        open.total += 1;
        Ok(ConnectionSlot {
            limits: Arc::clone(self),
            client,
        })
    }

    fn limit(&self, cap: Cap) -> (&'static str, usize) {
        match cap {
            Cap::Total => ("MAX_CONNECTIONS", self.max),
            Cap::PerAddress => ("MAX_CONNECTIONS_PER_ADDRESS", self.per_address),
        }
    }
}

/// The part of `MAX_CONNECTIONS` kept for clients with fewer than [`RESERVE_PER_CLIENT`] open
/// connections: one eighth.
const RESERVED_PART: usize = 8;

/// Clients holding this many connections (or more) cannot take the reserved part.
const RESERVE_PER_CLIENT: usize = 2;

/// One admitted connection; released when dropped.
struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    client: Option<IpAddr>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self
            .limits
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let Some(client) = self.client
            && let Some(count) = open.by_client.get_mut(&client)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.by_client.remove(&client);
            }
        }
    }
}

/// At most one `warn` line per cap this often, however many connections are refused.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Rate-limits the refusal log lines (the accept loop is one task: no lock).
#[derive(Default)]
struct RefusalLog {
    total: RefusalCount,
    per_address: RefusalCount,
}

#[derive(Default)]
struct RefusalCount {
    last_line: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    fn refused(&mut self, cap: Cap, peer: SocketAddr, limits: &ConnectionLimits, now: Instant) {
        let count = match cap {
            Cap::Total => &mut self.total,
            Cap::PerAddress => &mut self.per_address,
        };
        count.unlogged = count.unlogged.saturating_add(1);
        if count
            .last_line
            .is_some_and(|at| now.saturating_duration_since(at) < REFUSAL_LOG_EVERY)
        {
            return;
        }
        let (setting, limit) = limits.limit(cap);
        tracing::warn!(
            cap = setting,
            limit,
            client = %peer.ip(),
            refused_since_last_line = count.unlogged,
            "connection refused: too many open connections, closed at once (one such line per cap \
             every {}s at most)",
            REFUSAL_LOG_EVERY.as_secs()
        );
        count.last_line = Some(now);
        count.unlogged = 0;
    }
}

async fn flush_usage_periodically(
    service: Arc<KeyService>,
    every: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                match service.flush_usage().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(keys = n, "flushed last_used_at"),
                    Err(error) => tracing::warn!(%error, "last_used_at flush failed; will retry"),
                }
            }
            _ = stop.changed() => return,
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_in_total_and_per_client_and_released_on_drop() {
        let proxies = TrustedProxies::parse("10.0.0.1").expect("valid");
        let limits = Arc::new(ConnectionLimits::new(5, 2, proxies));
        let ip = |s: &str| -> IpAddr { s.parse().expect("address") };
        let a1 = limits.admit(ip("192.0.2.1")).expect("first");
        let a2 = limits
            .admit(ip("::ffff:192.0.2.1"))
            .expect("second (IPv4-mapped is IPv4)");
        assert!(matches!(
            limits.admit(ip("192.0.2.1")),
            Err(Cap::PerAddress)
        ));
        let b = limits.admit(ip("2001:db8:0:1::1")).expect("IPv6");
        drop(
            limits
                .admit(ip("2001:db8:0:1::2"))
                .expect("released at once"),
        );
        let b2 = limits
            .admit(ip("2001:db8:0:1::3"))
            .expect("the /64's second");
        assert!(
            matches!(limits.admit(ip("2001:db8:0:1::4")), Err(Cap::PerAddress)),
            "one /64 is one client"
        );
        // A trusted proxy has no cap of its own, only the total.
        let p1 = limits.admit(ip("10.0.0.1")).expect("proxy");
        assert!(
            matches!(limits.admit(ip("10.0.0.1")), Err(Cap::Total)),
            "5 open"
        );
        drop(a1);
        let p2 = limits.admit(ip("10.0.0.1")).expect("proxy's second");
        drop(a2);
        let p3 = limits.admit(ip("10.0.0.1")).expect("proxy's third");
        drop((b, b2, p1, p2, p3));
        let open = limits.open.lock().expect("lock");
        assert_eq!(open.total, 0);
        assert!(open.by_client.is_empty(), "closed clients are forgotten");
    }

    /// The review's finding: four IPv4 addresses (or one IPv6 /62) filled every connection and
    /// locked the admins out. The last eighth is kept for clients holding few connections.
    #[test]
    fn busy_addresses_leave_the_last_eighth_to_clients_with_few_connections() {
        let limits = Arc::new(ConnectionLimits::new(16, 4, TrustedProxies::default()));
        let ip = |s: &str| -> IpAddr { s.parse().expect("address") };
        let mut held = Vec::new();
        for n in 2..=4 {
            for _ in 0..4 {
                held.push(
                    limits
                        .admit(ip(&format!("192.0.2.{n}")))
                        .expect("under the caps"),
                );
            }
        }
        // 12 open: a fourth busy address takes two more, up to 14, and no further.
        held.push(limits.admit(ip("192.0.2.5")).expect("13th"));
        held.push(limits.admit(ip("192.0.2.5")).expect("14th"));
        assert!(matches!(limits.admit(ip("192.0.2.5")), Err(Cap::Total)));
        // An admin's first and second connections still get in.
        let admin = limits.admit(ip("198.51.100.7")).expect("an admin's first");
        let admin2 = limits.admit(ip("198.51.100.7")).expect("an admin's second");
        assert!(
            matches!(limits.admit(ip("203.0.113.9")), Err(Cap::Total)),
            "16: full"
        );
        drop(admin2);
        // The busy addresses cannot take the freed slot; a new client can.
        assert!(matches!(
            limits.admit(ip("192.0.2.2")),
            Err(Cap::PerAddress)
        ));
        assert!(matches!(limits.admit(ip("192.0.2.5")), Err(Cap::Total)));
        let newcomer = limits.admit(ip("203.0.113.9")).expect("a client with none");
        drop((held, admin, newcomer));
    }
}

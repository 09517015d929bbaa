//! `origin serve`: wire configuration, storage, the service and the router, and run until
//! SIGINT or SIGTERM, then flush pending usage and close the database. The KV publisher runs
//! beside the server; what it has not published stays in the outbox for the next start.

use std::sync::Arc;
use std::time::Duration;

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

use crate::audit::{self, AuditChain};
use crate::config::Config;
use crate::http::ingest::UsageIngest;
use crate::http::{AppParts, AppState, router};
use crate::kv::KvClient;
use crate::publish::{self, Publisher, PublisherStatus};
use crate::service::KeyService;
use crate::store::{KeyStore, SqliteStore};

/// Runs the service until a shutdown signal.
pub async fn serve(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let checkpoints = config.audit_checkpoint_file.clone().or_else(|| {
        SqliteStore::database_file(&config.database_url)
            .ok()
            .flatten()
            .map(|db| audit::default_checkpoint_path(&db))
    });
    match &checkpoints {
        Some(file) => {
            tracing::info!(file = %file.display(), "audit checkpoints are appended to this file and logged")
        }
        None => tracing::warn!(
            "audit checkpoints are only logged (an in-memory database and no AUDIT_CHECKPOINT_FILE)"
        ),
    }
    let chain = Arc::new(AuditChain::new(config.audit_chain_key.clone(), checkpoints));
    let sqlite = Arc::new(SqliteStore::open(&config.database_url, Some(chain)).await?);
    let durability = sqlite.durability().await?;
    tracing::info!(
        journal_mode = %durability.journal_mode,
        synchronous = %durability.synchronous_name(),
        "database durability"
    );
    let store: Arc<dyn KeyStore> = sqlite.clone();
    let service = Arc::new(KeyService::new(
        store.clone(),
        config.key_prefix.clone(),
        config.scope_policy.clone(),
    ));
    let publisher_status = Arc::new(PublisherStatus::new(config.kv.is_some()));
    let state = AppState::from(AppParts {
        service: service.clone(),
        admin_tokens: config.admin_tokens.clone().into(),
        publisher: publisher_status.clone(),
        usage_ingest: config
            .usage_secret
            .clone()
            .map(|secret| Arc::new(UsageIngest::new(secret))),
        admin_auth_failures_per_minute: config.admin_auth_failures_per_minute,
        request_read_timeout: config.request_read_timeout,
    });
    if state.usage_ingest.is_none() {
        tracing::info!("USAGE_SIGNING_SECRET is unset: POST /v1/usage (edge usage reports) is off");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let publisher = match &config.kv {
        Some(kv) => {
            let publisher = Publisher::new(
                store.clone(),
                KvClient::new(kv)?,
                publisher_status,
                kv.retry_max,
            );
            tracing::info!(kv_api_base = %kv.api_base, namespace = %kv.namespace_id, "publishing key records to Workers KV");
            Some(tokio::spawn(publisher.run(
                service.committed(),
                publish::lock_path(sqlite.file()),
                stop_rx.clone(),
            )))
        }
        None => {
            tracing::warn!(
                "KV_API_BASE and KV_NAMESPACE_ID are unset: KV publishing is OFF; changes wait in \
                 the outbox and the edge will not see them until publishing is configured"
            );
            None
        }
    };
    let flusher = tokio::spawn(flush_usage_periodically(
        service.clone(),
        config.last_used_flush,
        stop_rx,
    ));

    let listener = TcpListener::bind(config.listen).await?;
    tracing::info!(
        listen = %listener.local_addr()?,
        database = %config.database_url,
        admin_tokens = ?config.admin_tokens,
        "origin listening"
    );
    serve_http(listener, router(state), config.request_read_timeout).await;

    tracing::info!("shutting down: flushing last_used_at");
    let _ = stop_tx.send(true);
    let _ = flusher.await;
    if let Some(publisher) = publisher {
        let _ = publisher.await;
    }
    if let Err(error) = service.flush_usage().await {
        tracing::error!(%error, "final last_used_at flush failed");
    }
    store.close().await;
    Ok(())
}

/// Serves HTTP/1.1 on `listener` until a shutdown signal, then lets requests in flight finish
/// (for at most [`DRAIN_LIMIT`]).
///
/// Not `axum::serve`: it sets no timer, so hyper's header read timeout never fires and a client
/// sending its headers a byte a minute would hold its connection for ever. Here headers must
/// arrive within `read_timeout` (the body's own limit is in the JSON extractor), and each
/// request carries its peer address for the admin failure limit.
async fn serve_http(listener: TcpListener, app: axum::Router, read_timeout: Duration) {
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

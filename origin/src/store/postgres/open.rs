//! Opening the database: the pools, the embedded migrations (run under sqlx's advisory lock, so
//! replicas starting together do not race), durability read back from the server, the chain
//! checked, and the roles' leases (session advisory locks).

use super::*;

/// Connections for requests.
const REQUEST_CONNECTIONS: u32 = 16;
/// Connections for the background roles' reads.
const BACKGROUND_CONNECTIONS: u32 = 4;
/// How long a request waits for a free connection before it is answered 503.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a held lease's connection is checked.
const LEASE_CHECK: Duration = Duration::from_secs(1);

/// Every session's limits, so a replica that stalls or loses the network cannot hold the write
/// lock (or a row) for long: a lock waited for longer than 5 s is refused (answered 503), a
/// transaction left idle for 15 s is ended by the server (its locks with it), and no statement
/// runs longer than 60 s.
const SESSION_LIMITS: [(&str, &str); 3] = [
    ("lock_timeout", "5s"),
    ("idle_in_transaction_session_timeout", "15s"),
    ("statement_timeout", "60s"),
];

/// A lease's session, pinged every second while held: the server ends it (and frees the role)
/// once it has been idle 10 s (the holder stalled) or its peer stopped answering TCP keepalives
/// for about 20 s (the holder is gone, or the network between them).
const LEASE_LIMITS: [(&str, &str); 4] = [
    ("idle_session_timeout", "10s"),
    ("tcp_keepalives_idle", "5"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
];

/// `url`'s connection settings. A server reached over the network must be reached over TLS
/// that cannot be skipped: `sslmode=require`, `verify-ca` or `verify-full` (libpq's default,
/// `prefer`, falls back to plaintext silently). A Unix socket or a loopback address may go
/// without.
pub(super) fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    let options = PgConnectOptions::from_str(url)?;
    let host = options.get_host();
    let local = options.get_socket().is_some()
        || host.starts_with('/')
        || host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let enforced = matches!(
        options.get_ssl_mode(),
        PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull
    );
    if local || enforced {
        Ok(options)
    } else {
        Err(StoreError::Url(
            "names a PostgreSQL server over the network without sslmode=verify-full (or \
             verify-ca, or require): add ?sslmode=verify-full (with sslrootcert=… for a private \
             CA) so the connection cannot fall back to plaintext",
        ))
    }
}

impl PgStore {
    /// Opens the database at `url` (a `postgres://` URL), runs the embedded migrations, and
    /// checks that a commit is durable there. Without `chain`, the store can read the audit log
    /// but not append to it; with it, the chain's newest entry must verify with its key.
    pub async fn open(url: &str, chain: Option<Arc<AuditChain>>) -> Result<Self, StoreError> {
        let plain = connect_options(url)?;
        // Migrations on a connection of their own, without the timeouts below: a replica
        // starting beside another waits for its migrations (sqlx's advisory lock) as long as
        // they take.
        let mut migrating = PgConnection::connect_with(&plain).await?;
        sqlx::migrate!("./migrations/postgres")
            .run_direct(&mut migrating)
            .await?;
        let _ = migrating.close().await;
        let options = plain.clone().options(SESSION_LIMITS);
        let pool = PgPoolOptions::new()
            .max_connections(REQUEST_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        settings(&pool).await?.check()?;
        if let Some(chain) = &chain {
            check_chain_at_start(&pool, chain).await?;
        }
        let writer = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options.clone());
        let background = PgPoolOptions::new()
            .max_connections(BACKGROUND_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options.clone());
        let (changes, queue) = mpsc::channel(4 * GROUP_MAX);
        tokio::spawn(group_commit(
            PgWriter {
                pool: writer.clone(),
                chain,
            },
            queue,
        ));
        Ok(Self {
            pool,
            background,
            writer,
            options: plain,
            changes,
            ledger_sink: Arc::new(AtomicBool::new(true)),
        })
    }

    /// The same database for the background roles: reads through their own connections.
    pub(super) fn background_copy(&self) -> Self {
        Self {
            pool: self.background.clone(),
            ..self.clone()
        }
    }

    /// Takes the lease of `role` if it is free: a connection of its own holding the session
    /// advisory lock, watched by a task that raises the lease's `lost` flag if the connection
    /// stops answering (the server restarted, or the network dropped it: the server then
    /// released the lock, and another replica may take it).
    pub(super) async fn lease(
        &self,
        role: lease::Role,
    ) -> Result<Option<lease::Lease>, StoreError> {
        let Some(mut conn) = role_lock_session(&self.options, role).await? else {
            return Ok(None);
        };
        let lost = Arc::new(AtomicBool::new(false));
        let (release, mut released) = oneshot::channel::<()>();
        let watch_lost = lost.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut released => break,
                    () = tokio::time::sleep(LEASE_CHECK) => {}
                }
                let alive = tokio::time::timeout(LEASE_CHECK, conn.ping()).await;
                if !matches!(alive, Ok(Ok(()))) {
                    watch_lost.store(true, Ordering::Release);
                    tracing::warn!(
                        role = role.name(),
                        "the connection holding the lease was lost: the role stops here"
                    );
                    return;
                }
            }
            // Released: closing the session ends the advisory lock.
            let _ = conn.close().await;
        });
        Ok(Some(lease::Lease::losable(
            role,
            Box::new(ReleaseOnDrop(Some(release))),
            lost,
        )))
    }
}

/// Tells the lease's keeper to close its connection when the lease is dropped.
struct ReleaseOnDrop(Option<oneshot::Sender<()>>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(release) = self.0.take() {
            let _ = release.send(());
        }
    }
}

/// A lease's session (its own connection, with [`LEASE_LIMITS`]) holding `role`'s advisory
/// lock; `None` (the connection closed) while another session holds it.
pub(super) async fn role_lock_session(
    options: &PgConnectOptions,
    role: lease::Role,
) -> Result<Option<PgConnection>, StoreError> {
    let options = options.clone().options(LEASE_LIMITS);
    let mut conn = PgConnection::connect_with(&options).await?;
    let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(LOCKS)
        .bind(role_lock(role))
        .fetch_one(&mut conn)
        .await?;
    if !taken {
        let _ = conn.close().await;
        return Ok(None);
    }
    Ok(Some(conn))
}

/// A role's number in [`LOCKS`]; the write lock is 0.
fn role_lock(role: lease::Role) -> i32 {
    match role {
        lease::Role::Publisher => 1,
        lease::Role::Ledger => 2,
        lease::Role::Webhooks => 3,
        lease::Role::Policy => 4,
    }
}

/// The server's durability settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Settings {
    /// `fsync`: `on` unless someone traded safety for speed.
    pub(super) fsync: String,
    /// `synchronous_commit`: `on` (or `remote_write`, `remote_apply`, `local`) waits for the
    /// commit record to be flushed before answering; `off` does not.
    pub(super) synchronous_commit: String,
}

impl Settings {
    /// Whether an acknowledged commit survives a crash of the server.
    pub(super) fn check(&self) -> Result<(), StoreError> {
        if self.fsync == "on" && self.synchronous_commit != "off" {
            Ok(())
        } else {
            Err(StoreError::NotDurable(format!(
                "the database runs with fsync={} synchronous_commit={}: an acknowledged commit \
                 could be lost in a crash (set fsync=on and synchronous_commit=on)",
                self.fsync, self.synchronous_commit
            )))
        }
    }
}

pub(super) async fn settings(pool: &PgPool) -> Result<Settings, StoreError> {
    let (fsync, synchronous_commit): (String, String) =
        sqlx::query_as("SELECT current_setting('fsync'), current_setting('synchronous_commit')")
            .fetch_one(pool)
            .await?;
    Ok(Settings {
        fsync,
        synchronous_commit,
    })
}

/// At start with a key: the log must not end before the newest checkpoint, must not be empty
/// while keys exist, and its newest entry must verify with the key.
async fn check_chain_at_start(pool: &PgPool, chain: &AuditChain) -> Result<(), StoreError> {
    let newest: Option<AuditRow> = sqlx::query_as(
        "SELECT seq, at, actor, action, key_id, details, prev_hash, hash, chain FROM audit_log \
         ORDER BY seq DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    let last = newest.as_ref().map_or(0, |row| row.0);
    refuse_truncated(chain, last)?;
    let Some(row) = newest else {
        let keys: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(pool)
            .await?;
        return refuse_wiped(keys);
    };
    check_newest(chain, row)
}

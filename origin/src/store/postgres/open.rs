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

impl PgStore {
    /// Opens the database at `url` (a `postgres://` URL), runs the embedded migrations, and
    /// checks that a commit is durable there. Without `chain`, the store can read the audit log
    /// but not append to it; with it, the chain's newest entry must verify with its key.
    pub async fn open(url: &str, chain: Option<Arc<AuditChain>>) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(REQUEST_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
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
            options,
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
        let mut conn = PgConnection::connect_with(&self.options).await?;
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(LOCKS)
            .bind(role_lock(role))
            .fetch_one(&mut conn)
            .await?;
        if !taken {
            let _ = conn.close().await;
            return Ok(None);
        }
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

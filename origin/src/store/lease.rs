//! The background roles' lease: whatever the number of origins serving from one database, one
//! process at a time plays each role (publishing to KV, feeding the change ledger, delivering
//! webhooks, running the key policies). With SQLite the lease is a file lock beside the
//! database file (`<database>.<role>.lock`), released when its file is dropped or the process
//! dies; an in-memory database has none (no other process can share it). With PostgreSQL it
//! is a session advisory lock, held by a connection of its own and released when that
//! connection closes (the process died, or the database restarted: see [`Lease::lost`]).

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// A role's lease, held until dropped: with SQLite, the lock file (none for an in-memory
/// database, which no other process can share); with PostgreSQL, the connection holding the
/// advisory lock, and a flag its keeper raises if that connection is lost.
#[must_use = "the lease ends when it is dropped"]
pub struct Lease {
    #[allow(dead_code, reason = "held for its lock, released on drop")]
    held: Option<Box<dyn std::any::Any + Send + Sync>>,
    lost: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Counts the lease in [`held_roles`] while it lives.
    _counted: Counted,
}

/// How many leases of each role ([`Role::ALL`]'s order) this process holds.
static HELD: [AtomicUsize; 4] = [const { AtomicUsize::new(0) }; 4];

/// One lease of a role, counted in [`HELD`] from its making until it is dropped.
struct Counted(Role);

impl Counted {
    fn new(role: Role) -> Self {
        HELD[role.index()].fetch_add(1, Ordering::Relaxed);
        Self(role)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        HELD[self.0.index()].fetch_sub(1, Ordering::Relaxed);
    }
}

/// The roles whose lease this process holds now, by name (`/healthz`'s `roles`): with several
/// origins on one database, each role shows on the one replica playing it. A lease lost a
/// moment ago shows until its role's loop lets it go (within a second).
pub fn held_roles() -> Vec<&'static str> {
    Role::ALL
        .into_iter()
        .filter(|role| HELD[role.index()].load(Ordering::Relaxed) > 0)
        .map(Role::name)
        .collect()
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("held", &self.held.is_some())
            .field("lost", &self.lost())
            .finish()
    }
}

impl Lease {
    /// The lease of a file database's `role`: its lock file, held.
    pub(crate) fn file(role: Role, file: File) -> Self {
        Self {
            held: Some(Box::new(file)),
            lost: None,
            _counted: Counted::new(role),
        }
    }

    /// The lease of an in-memory database's `role`, which no other process can share.
    pub(crate) fn unshared(role: Role) -> Self {
        Self {
            held: None,
            lost: None,
            _counted: Counted::new(role),
        }
    }

    /// A lease held by `holder` (dropping it releases the lease), which can be lost while held:
    /// `lost` turns true when it is.
    pub(crate) fn losable(
        role: Role,
        holder: Box<dyn std::any::Any + Send + Sync>,
        lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        Self {
            held: Some(holder),
            lost: Some(lost),
            _counted: Counted::new(role),
        }
    }

    /// Returns once the lease is lost (never, for a lease that cannot be lost). A role runs
    /// its work against this and stops as soon as it returns: another process may hold the
    /// role by then.
    pub async fn lost_wait(&self) {
        if self.lost.is_none() {
            return std::future::pending().await;
        }
        while !self.lost() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the lease was lost while held (its database connection closed: another process
    /// may hold the role now). A file lock is never lost while its process lives.
    pub fn lost(&self) -> bool {
        self.lost
            .as_ref()
            .is_some_and(|l| l.load(std::sync::atomic::Ordering::Acquire))
    }
}

/// A background role: one process plays it at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Publishing key records to Workers KV (and `origin sync --full`).
    Publisher,
    /// Feeding the edge's change ledger, watermarks included.
    Ledger,
    /// Delivering event webhooks.
    Webhooks,
    /// Running the key lifecycle policies.
    Policy,
}

impl Role {
    /// Every role.
    pub const ALL: [Self; 4] = [Self::Publisher, Self::Ledger, Self::Webhooks, Self::Policy];

    /// The role's place in [`Role::ALL`].
    fn index(self) -> usize {
        match self {
            Self::Publisher => 0,
            Self::Ledger => 1,
            Self::Webhooks => 2,
            Self::Policy => 3,
        }
    }

    /// The role's name in its lock file's.
    pub fn name(self) -> &'static str {
        match self {
            Self::Publisher => "publisher",
            Self::Ledger => "ledger",
            Self::Webhooks => "webhooks",
            Self::Policy => "policy",
        }
    }
}

/// The lock of `role` next to a database file (`<database>.<role>.lock`), or `None` for an
/// in-memory database, which no other process can share.
pub fn lock_path(database_file: Option<&Path>, role: Role) -> Option<PathBuf> {
    database_file.map(|file| {
        let mut name = file.as_os_str().to_owned();
        name.push(format!(".{}.lock", role.name()));
        PathBuf::from(name)
    })
}

/// Says that `role`'s lease was lost and its work stopped; the role's loop then waits to take
/// the lease again (another process may hold it by then).
pub fn lost_lease(role: Role) {
    tracing::warn!(
        role = role.name(),
        "the role's lease was lost (its database connection closed): its work stopped here, \
         until the lease is taken again"
    );
}

/// `stop` turned before the lock was ours.
#[derive(Debug)]
pub struct Stopped;

/// A background role's lock ([`lock_path`]): taken, waiting while another process holds it, if
/// there is one (a file database); `Err(Stopped)` if `stop` turned first.
pub async fn hold_lock(
    path: Option<&Path>,
    stop: &mut watch::Receiver<bool>,
    waiting: &str,
) -> Result<Option<File>, Stopped> {
    match path {
        Some(path) => wait_for_lock(path, stop, waiting)
            .await
            .map(Some)
            .ok_or(Stopped),
        None => Ok(None),
    }
}

/// Waits until the lock at `path` is ours, or `stop` turns true (`None`); says `waiting` once
/// while another process holds it.
async fn wait_for_lock(
    path: &Path,
    stop: &mut watch::Receiver<bool>,
    waiting: &str,
) -> Option<File> {
    let mut announced = false;
    loop {
        match try_lock(path) {
            Ok(Some(file)) => return Some(file),
            Ok(None) => {
                if !announced {
                    tracing::warn!(lock = %path.display(), "{waiting}");
                    announced = true;
                }
            }
            Err(error) => {
                tracing::error!(%error, lock = %path.display(), "cannot open the lock; retrying");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return None,
        }
    }
}

/// Takes a role's lock without waiting: `Ok(None)` if another process holds it. The lock
/// is released when the returned file is dropped or the process dies.
pub fn try_lock(path: &Path) -> std::io::Result<Option<File>> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_admits_one_holder_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path =
            lock_path(Some(&dir.path().join("db.sqlite")), Role::Publisher).expect("file database");
        let held = try_lock(&path).expect("opens").expect("free");
        assert!(
            try_lock(&path).expect("opens").is_none(),
            "second holder refused"
        );
        drop(held);
        assert!(
            try_lock(&path).expect("opens").is_some(),
            "free again after release"
        );
    }

    #[test]
    fn each_role_has_its_own_lock_beside_the_database() {
        let file = Path::new("/data/latchkey.db");
        assert_eq!(
            lock_path(Some(file), Role::Ledger),
            Some(PathBuf::from("/data/latchkey.db.ledger.lock"))
        );
        assert_ne!(
            lock_path(Some(file), Role::Webhooks),
            lock_path(Some(file), Role::Policy)
        );
        assert_eq!(lock_path(None, Role::Publisher), None);
    }
}

//! `last_used_at` without a database write per verification.
//!
//! A successful verification only records the time in memory. A background task writes all
//! pending times in one transaction every `LAST_USED_FLUSH_MS` (and once more on a clean
//! shutdown). A crash loses at most the last interval's updates: `last_used_at` may then be
//! older than the true last use by up to that interval. Reads merge the pending times, so the
//! API shows the latest use at once, and the list filters on use (`never_used`,
//! `last_used_before`) flush first, since they run in the database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use latchkey_shared::{KeyId, UnixMillis};

use crate::store::{KeyStore, StoreError};

/// Pending `last_used_at` times, newest per key.
///
/// A key already pending is touched under the shared (read) lock with an atomic maximum, so
/// verifications of a busy key on several threads do not queue for a lock; only a key's first
/// use since the last flush takes the write lock.
#[derive(Debug, Default)]
pub struct UsageTracker {
    pending: RwLock<HashMap<KeyId, AtomicI64>>,
}

impl UsageTracker {
    // The map holds plain data; a panic elsewhere cannot leave it inconsistent.
    fn read(&self) -> RwLockReadGuard<'_, HashMap<KeyId, AtomicI64>> {
        self.pending.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<KeyId, AtomicI64>> {
        self.pending.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a use of `id` at `at`; returns the newest pending use of `id` (`at` or later).
    pub fn touch(&self, id: &KeyId, at: UnixMillis) -> UnixMillis {
        if let Some(t) = self.read().get(id) {
            return UnixMillis(t.fetch_max(at.0, Ordering::Relaxed).max(at.0));
        }
        let mut pending = self.write();
        let t = pending
            .entry(id.clone())
            .or_insert_with(|| AtomicI64::new(at.0));
        UnixMillis(t.fetch_max(at.0, Ordering::Relaxed).max(at.0))
    }

    /// The pending (not yet written) last use of `id`, if any.
    pub fn pending(&self, id: &KeyId) -> Option<UnixMillis> {
        self.read()
            .get(id)
            .map(|t| UnixMillis(t.load(Ordering::Relaxed)))
    }

    /// Writes every pending time in one transaction. On failure the times go back into the
    /// map (keeping any newer use that arrived meanwhile), to be retried at the next flush.
    pub async fn flush(&self, store: &dyn KeyStore) -> Result<usize, StoreError> {
        let batch: Vec<(KeyId, UnixMillis)> = self
            .write()
            .drain()
            .map(|(id, t)| (id, UnixMillis(t.into_inner())))
            .collect();
        if batch.is_empty() {
            return Ok(0);
        }
        match store.record_usage(&batch).await {
            Ok(()) => Ok(batch.len()),
            Err(e) => {
                for (id, at) in &batch {
                    self.touch(id, *at);
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touch_keeps_the_newest_time() {
        let t = UsageTracker::default();
        let id = KeyId::parse("key_0123456789abcdefABCD").expect("valid");
        assert_eq!(t.touch(&id, UnixMillis(20)), UnixMillis(20));
        assert_eq!(t.touch(&id, UnixMillis(10)), UnixMillis(20));
        assert_eq!(t.pending(&id), Some(UnixMillis(20)));
        assert_eq!(t.touch(&id, UnixMillis(30)), UnixMillis(30));
        assert_eq!(t.pending(&id), Some(UnixMillis(30)));
    }
}

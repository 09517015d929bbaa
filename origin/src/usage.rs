//! `last_used_at` without a database write per verification.
//!
//! A successful verification only records the time in memory. A background task writes all
//! pending times in one transaction every `LAST_USED_FLUSH_MS` (and once more on a clean
//! shutdown). A crash loses at most the last interval's updates: `last_used_at` may then be
//! older than the true last use by up to that interval. Reads merge the pending times, so the
//! API shows the latest use at once, and the list filters on use (`never_used`,
//! `last_used_before`) flush first, since they run in the database.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use latchkey_shared::{KeyId, UnixMillis};

use crate::store::{KeyStore, StoreError};

/// Pending `last_used_at` times, newest per key.
#[derive(Debug, Default)]
pub struct UsageTracker {
    pending: Mutex<HashMap<KeyId, UnixMillis>>,
}

impl UsageTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<KeyId, UnixMillis>> {
        // The map holds plain data; a panic elsewhere cannot leave it inconsistent.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a use of `id` at `at`.
    pub fn touch(&self, id: &KeyId, at: UnixMillis) {
        let mut pending = self.lock();
        match pending.get_mut(id) {
            Some(t) => *t = (*t).max(at),
            None => {
                pending.insert(id.clone(), at);
            }
        }
    }

    /// The pending (not yet written) last use of `id`, if any.
    pub fn pending(&self, id: &KeyId) -> Option<UnixMillis> {
        self.lock().get(id).copied()
    }

    /// Writes every pending time in one transaction. On failure the times go back into the
    /// map (keeping any newer use that arrived meanwhile), to be retried at the next flush.
    pub async fn flush(&self, store: &dyn KeyStore) -> Result<usize, StoreError> {
        let batch: Vec<(KeyId, UnixMillis)> = self.lock().drain().collect();
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
        t.touch(&id, UnixMillis(20));
        t.touch(&id, UnixMillis(10));
        assert_eq!(t.pending(&id), Some(UnixMillis(20)));
        t.touch(&id, UnixMillis(30));
        assert_eq!(t.pending(&id), Some(UnixMillis(30)));
    }
}

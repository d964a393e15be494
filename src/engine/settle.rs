//! Settle: knowing when the pipeline has nothing left to do.
//!
//! [`Activity`] counts outstanding events: one per event a queue has been
//! given (or will be, once the change log delivers it), until the event is
//! processed or dead-lettered. A handler's own writes are counted before the
//! event that caused them ends, so the count can only reach zero when the
//! whole chain is done.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Clone, Default)]
pub struct Activity(Arc<Inner>);

#[derive(Default)]
struct Inner {
    /// Events handed to (or owed to) a queue and not yet finished.
    outstanding: AtomicU64,
    /// Woken whenever `outstanding` drops to zero.
    idle: Notify,
}

impl Activity {
    /// `n` more events are owed to queues.
    pub fn begin(&self, n: u64) {
        self.0.outstanding.fetch_add(n, Ordering::SeqCst);
    }

    /// `n` events have ended (processed or dead-lettered).
    pub fn end(&self, n: u64) {
        let before = self.0.outstanding.fetch_sub(n, Ordering::SeqCst);
        debug_assert!(before >= n, "activity ended more events than began");
        if before == n {
            self.0.idle.notify_waiters();
        }
    }

    pub fn outstanding(&self) -> u64 {
        self.0.outstanding.load(Ordering::SeqCst)
    }

    /// Waits until nothing is outstanding; `false` if `timeout` passed first.
    pub async fn settle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.0.idle.notified();
            tokio::pin!(idle);
            // Register before checking so a drop to zero in between is seen.
            idle.as_mut().enable();
            if self.outstanding() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.outstanding() == 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn settles_once_every_event_ended() {
        let activity = Activity::default();
        activity.begin(2);
        assert!(!activity.settle(Duration::from_millis(1)).await);
        let waiter = tokio::spawn({
            let activity = activity.clone();
            async move { activity.settle(Duration::from_secs(30)).await }
        });
        activity.end(1);
        activity.end(1);
        assert!(waiter.await.unwrap());
    }
}

//! A bounded memory of keys already applied, for idempotent ingest.
//!
//! Remembers the last `capacity` keys in arrival order; the oldest is
//! forgotten when a new one arrives at capacity, so memory is bounded by
//! configuration and a re-send within the window is recognised.
//!
//! A key is stored as a [`DedupKey`], a fixed-size digest of the parts that
//! name it, never the parts themselves: a CloudEvent whose `source` is
//! megabytes long costs the window 32 bytes, like any other.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// The SHA-256 digest of a key's parts, each length-prefixed so that no two
/// different lists of parts (`["ab", "c"]`, `["a", "bc"]`) share a key.
/// A collision, which would make a new event look like a duplicate, is as
/// unlikely as SHA-256 makes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DedupKey([u8; 32]);

impl DedupKey {
    pub fn of(parts: &[&str]) -> Self {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        Self(hasher.finalize().into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn bytes(&self) -> [u8; 32] {
        self.0
    }
}

pub struct DedupWindow {
    capacity: usize,
    /// Never held across an await; one short insert per key.
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    seen: HashSet<DedupKey>,
    order: VecDeque<DedupKey>,
}

impl DedupWindow {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Puts back a key read from disk (in the order they were recorded).
    pub fn restore(&self, key: DedupKey) {
        self.first_time(key);
    }

    /// The keys in the window, oldest first (for a snapshot).
    pub fn keys(&self) -> Vec<DedupKey> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.order.iter().copied().collect()
    }

    /// Records `key`; `false` if it was already in the window.
    pub fn first_time(&self, key: DedupKey) -> bool {
        if self.capacity == 0 {
            return true;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !inner.seen.insert(key) {
            return false;
        }
        if inner.order.len() == self.capacity
            && let Some(oldest) = inner.order.pop_front()
        {
            inner.seen.remove(&oldest);
        }
        inner.order.push_back(key);
        true
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .order
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> DedupKey {
        DedupKey::of(&[s])
    }

    #[test]
    fn remembers_the_last_keys_only() {
        let window = DedupWindow::new(2);
        assert!(window.first_time(key("a")));
        assert!(!window.first_time(key("a")));
        assert!(window.first_time(key("b")));
        assert!(window.first_time(key("c")));
        assert_eq!(window.len(), 2);
        assert!(
            window.first_time(key("a")),
            "a was forgotten when c arrived"
        );
        assert!(!window.first_time(key("c")));
    }

    #[test]
    fn parts_are_not_confused_by_where_they_split() {
        assert_ne!(DedupKey::of(&["ab", "c"]), DedupKey::of(&["a", "bc"]));
        assert_ne!(DedupKey::of(&["a\u{0}b", ""]), DedupKey::of(&["a", "b"]));
        assert_eq!(DedupKey::of(&["src", "1"]), DedupKey::of(&["src", "1"]));
    }
}

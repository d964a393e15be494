//! A bounded memory of keys already applied, for idempotent ingest.
//!
//! Remembers the last `capacity` keys in arrival order; the oldest is
//! forgotten when a new one arrives at capacity, so memory is bounded by
//! configuration and a re-send within the window is recognised.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

pub struct DedupWindow {
    capacity: usize,
    /// Never held across an await; one short insert per key.
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    seen: HashSet<Box<str>>,
    order: VecDeque<Box<str>>,
}

impl DedupWindow {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Records `key`; `false` if it was already in the window.
    pub fn first_time(&self, key: &str) -> bool {
        if self.capacity == 0 {
            return true;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.seen.contains(key) {
            return false;
        }
        if inner.order.len() == self.capacity
            && let Some(oldest) = inner.order.pop_front()
        {
            inner.seen.remove(&oldest);
        }
        inner.seen.insert(key.into());
        inner.order.push_back(key.into());
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

    #[test]
    fn remembers_the_last_keys_only() {
        let window = DedupWindow::new(2);
        assert!(window.first_time("a"));
        assert!(!window.first_time("a"));
        assert!(window.first_time("b"));
        assert!(window.first_time("c"));
        assert_eq!(window.len(), 2);
        assert!(window.first_time("a"), "a was forgotten when c arrived");
        assert!(!window.first_time("c"));
    }
}

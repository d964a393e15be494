//! Where tables keep their state when it is shared by several processes.
//!
//! In memory (and on a data directory) a table is the state, and a write
//! is one step under a shard lock. On a shared store (JetStream), each
//! process's tables are a *replica* of the store, and a write is a
//! compare-and-set: the table works out what the write does from its
//! replica's copy of the record, exactly as in memory, then asks the store
//! to take the new state only if the record's state there is still the one
//! it started from. If another process got there first, the table reads
//! the record's latest state and works it out again. The state a write
//! publishes carries the change it makes, so the two are one message: no
//! write without its change, no change without its write.
//!
//! The store sends every state it takes back to every replica, in its own
//! order ([`Table::replicate`](super::table::Table::replicate)); that is
//! the only way a replica changes, so every replica holds the same states
//! and the same change log.

use futures_util::future::BoxFuture;

/// Why a store did not take a state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The record's state in the store is no longer the one expected.
    #[error("the record's state moved on")]
    Conflict,
    /// The store cannot be reached, or failed; nothing was written.
    #[error("the shared store is unavailable: {0}")]
    Unavailable(String),
}

/// What of a table a state is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key<'a> {
    /// The record with this id ([`crate::storage::effect::StateFrame`]).
    Record(&'a str),
    /// The table's current reconciliation
    /// ([`crate::storage::effect::CurrentFrame`]).
    Current,
    /// What was last applied of this parent's child list (a listing
    /// table's; [`crate::storage::effect::AppliedFrame`]).
    Mark(&'a str),
}

/// A record's state as the store holds it: its revision there and the
/// frame written.
pub struct Stored {
    pub rev: u64,
    pub frame: Vec<u8>,
}

pub trait Store: Send + Sync + 'static {
    /// Takes `frame` as the new state of `table`'s `key` if its latest
    /// revision is `expected` (0: the store has none), and returns the new
    /// revision once this process's replica has it (so a read after a write
    /// sees it).
    fn put<'a>(
        &'a self,
        table: &'a str,
        key: Key<'a>,
        expected: u64,
        frame: Vec<u8>,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// How far this process's replica has applied the store: everything
    /// read from the replica now is at least as new as this revision.
    fn applied(&self) -> u64;

    /// The latest state of `table`'s `key`, read from the store itself
    /// (the replica may be behind).
    fn latest<'a>(
        &'a self,
        table: &'a str,
        key: Key<'a>,
    ) -> BoxFuture<'a, Result<Option<Stored>, StoreError>>;
}

/// What a queue fed by a shared store tells the store of each item it
/// took, named by the item's ticket, so that an item is finished once
/// whichever process took it, and taken again by another if that process
/// dies first.
pub trait Acks: Send + Sync + 'static {
    /// The item ended: processed, or dead-lettered.
    fn done(&self, ticket: u64);

    /// The item failed and is to be tried again after `delay`, by whichever
    /// process takes it then.
    fn retry(&self, ticket: u64, delay: std::time::Duration);

    /// The item is given up on: keeps its dead letter (the item as its
    /// queue stores it, why, after how many attempts, when) where every
    /// process sees it, then ends the item. `false` if dead letters are
    /// kept by the queue itself.
    fn dead(
        &self,
        ticket: u64,
        item: serde_json::Value,
        error: &str,
        attempts: u32,
        at: crate::engine::record::Timestamp,
    ) -> bool;
}

/// The dedup window on a shared store: keys of CloudEvents applied, the
/// last so many of them, whichever process applied them.
pub trait SharedWindow: Send + Sync + 'static {
    /// Whether `key` is in the window.
    fn contains(&self, key: [u8; 32]) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Adds `key` once its event is applied; `false` if another process
    /// added it first (the event was applied twice, which converges).
    fn add(&self, key: [u8; 32]) -> BoxFuture<'_, Result<bool, StoreError>>;
}

/// Where a queue's items go, on a shared store, when they are put on it
/// outside its feed (encode jobs): a stream that every process's consumer
/// of the queue reads, so that each item is taken by one of them.
pub trait Outbox: Send + Sync + 'static {
    /// Sends one item, named by `id`: one sent again under the same id (a
    /// step done again) is kept once.
    fn send(
        &self,
        id: uuid::Uuid,
        item: serde_json::Value,
    ) -> BoxFuture<'_, Result<(), StoreError>>;
}

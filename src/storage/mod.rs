//! Durable storage for `--data-dir`: the pieces the engine's state is
//! written through so that it survives the process (see API.md,
//! "Durability", and DESIGN.md, "Three ways to run, one engine").
//!
//! - [`frame`]: length + CRC32 frames, and telling a torn tail from damage;
//! - [`disk`]: the directory behind a trait, with a double that loses or
//!   tears unsynced bytes in a simulated crash (for tests);
//! - [`wal`]: the write-ahead log: segments, commits (one sync for all that
//!   was appended), recovery, and poisoning on a failed write or sync;
//! - [`commit`]: group commit: one writer thread, one sync for all that was
//!   appended, writers waiting until their frames are durable;
//! - [`snapshot`]: the state as of a log position, written whole or not at
//!   all;
//! - [`lock`]: one server per data directory;
//! - [`effect`]: what the frames hold (effects, never commands);
//! - [`journal`]: what the engine appends its effects through.

pub mod commit;
pub mod disk;
pub mod effect;
pub mod frame;
pub mod journal;
pub mod lock;
pub mod snapshot;
pub mod wal;

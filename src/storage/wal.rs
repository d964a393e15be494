//! The write-ahead log: frames appended to segment files and committed by
//! one sync for everything appended since the last commit.
//!
//! Each frame gets a log sequence number (LSN), from 1, gapless. A segment
//! is named by the LSN of its first frame (`00000000000000000001.wal`); a
//! new one starts once the current one holds `segment_bytes`, right after a
//! commit, so every segment but the last is wholly synced.
//!
//! Opening the log reads every segment in order ([`frame::scan`]): a torn
//! tail in the last segment (a crash mid-write) is cut off with a warning;
//! anything else wrong (damage, a torn frame in an earlier segment, a gap
//! between segments) stops the open with the file and offset.
//!
//! A failed write or sync poisons the log: the kernel may have dropped the
//! pages it could not write, so nothing appended since the last good commit
//! can be said to be durable, and no commit succeeds again until the log is
//! reopened from disk.

use std::io;

use super::disk::Disk;
use super::frame::{self, End};

const SUFFIX: &str = ".wal";

fn segment_name(first: u64) -> String {
    format!("{first:020}{SUFFIX}")
}

/// A frame read back when the log is opened: a range of its segment's
/// bytes, which the frames of one segment share (no copy per frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    pub lsn: u64,
    pub kind: u8,
    segment: std::sync::Arc<Vec<u8>>,
    range: std::ops::Range<usize>,
}

impl Recovered {
    pub fn payload(&self) -> &[u8] {
        &self.segment[self.range.clone()]
    }
}

/// Why the log could not be opened; nothing was changed on disk.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{file}: {error}")]
    Io { file: String, error: io::Error },
    #[error("{file}: {damage}")]
    Damage { file: String, damage: frame::Damage },
    #[error(
        "{file}: a torn frame at offset {offset}, but later segments follow it \
         (only the last segment can end mid-write)"
    )]
    TornMiddle { file: String, offset: usize },
    #[error("{file}: starts at frame {found}, but the segment before it ends at {expected}")]
    Gap {
        file: String,
        expected: u64,
        found: u64,
    },
}

/// A write or sync of the log failed; no commit succeeds from then on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the log could not be written ({0}); nothing more is acknowledged until the server \
     restarts"
)]
pub struct Poisoned(pub String);

pub struct Wal<D: Disk> {
    disk: D,
    segment_bytes: u64,
    /// The segment being appended to, and its length on disk.
    current: String,
    written: u64,
    /// Frames appended and not yet committed.
    pending: Vec<u8>,
    /// The LSN the next frame gets.
    next: u64,
    /// The last LSN known to be durable.
    durable: u64,
    poisoned: Option<Poisoned>,
    /// Whether a commit syncs (`--sync always`) or leaves it to the OS.
    sync: bool,
    /// Bytes in the segments before the current one.
    earlier: u64,
    /// Segment files on disk.
    segment_count: usize,
}

impl<D: Disk> Wal<D> {
    /// Opens the log on `disk`, cutting a torn tail, and returns it with
    /// every frame it holds, in order.
    pub fn open(disk: D, segment_bytes: u64) -> Result<(Self, Vec<Recovered>), OpenError> {
        Self::open_after(disk, segment_bytes, 0)
    }

    /// Opens the log for a state that already holds every frame up to
    /// `after` (a snapshot's): returns the frames after it. Segments before
    /// it may have been removed; the ones left must reach back to it.
    pub fn open_after(
        disk: D,
        segment_bytes: u64,
        after: u64,
    ) -> Result<(Self, Vec<Recovered>), OpenError> {
        let io = |file: &str| {
            let file = file.to_string();
            move |error| OpenError::Io { file, error }
        };
        let mut segments: Vec<(u64, String)> = disk
            .list()
            .map_err(io("the data directory"))?
            .into_iter()
            .filter_map(|name| {
                let first = name.strip_suffix(SUFFIX)?.parse().ok()?;
                Some((first, name))
            })
            .collect();
        segments.sort();
        let mut recovered = Vec::new();
        let mut next = match segments.first() {
            Some((first, name)) if *first > after + 1 => {
                return Err(OpenError::Gap {
                    file: name.clone(),
                    expected: after + 1,
                    found: *first,
                });
            }
            Some((first, _)) => *first,
            None => after + 1,
        };
        let mut written = 0;
        let last = segments.len().saturating_sub(1);
        for (index, (first, name)) in segments.iter().enumerate() {
            if *first != next {
                return Err(OpenError::Gap {
                    file: name.clone(),
                    expected: next,
                    found: *first,
                });
            }
            // A segment whose frames the state holds already (the next one
            // starts at or before `after + 1`) is kept for an older
            // snapshot, not read.
            if let Some((following, _)) = segments.get(index + 1)
                && *following <= after + 1
            {
                next = *following;
                continue;
            }
            let bytes = disk.read(name).map_err(io(name))?;
            let scanned = frame::scan(&bytes).map_err(|damage| OpenError::Damage {
                file: name.clone(),
                damage,
            })?;
            let mut length = scanned.frames.last().map_or(0, |f| f.payload.end as u64);
            if let End::Torn { at } = scanned.end {
                if index != last {
                    return Err(OpenError::TornMiddle {
                        file: name.clone(),
                        offset: at,
                    });
                }
                tracing::warn!(file = %name, offset = at, "cutting a torn last frame");
                disk.truncate(name, at as u64).map_err(io(name))?;
                length = at as u64;
            } else if bytes.len() as u64 != length {
                // Trailing zeros: appends go after the last frame.
                disk.truncate(name, length).map_err(io(name))?;
            }
            let segment = std::sync::Arc::new(bytes);
            for f in scanned.frames {
                if next > after {
                    recovered.push(Recovered {
                        lsn: next,
                        kind: f.kind,
                        segment: segment.clone(),
                        range: f.payload,
                    });
                }
                next += 1;
            }
            written = length;
        }
        let current = match segments.last() {
            Some((_, name)) => name.clone(),
            None => {
                let name = segment_name(next);
                disk.create(&name).map_err(io(&name))?;
                name
            }
        };
        let wal = Self {
            disk,
            segment_bytes,
            current,
            written,
            pending: Vec::new(),
            next,
            durable: next - 1,
            poisoned: None,
            sync: true,
            earlier: 0,
            segment_count: 0,
        };
        let mut wal = wal;
        wal.earlier = wal.count_earlier();
        wal.segment_count = wal.segments().map_or(1, |s| s.len());
        Ok((wal, recovered))
    }

    /// Appends a frame to be written by the next commit; its LSN.
    pub fn append(&mut self, kind: u8, payload: &[u8]) -> Result<u64, Poisoned> {
        if let Some(poisoned) = &self.poisoned {
            return Err(poisoned.clone());
        }
        frame::encode(kind, payload, &mut self.pending);
        self.next += 1;
        Ok(self.next - 1)
    }

    /// Writes and syncs everything appended; returns the last durable LSN.
    pub fn commit(&mut self) -> Result<u64, Poisoned> {
        let pending = std::mem::take(&mut self.pending);
        let result = self.write_batch(&pending, self.next - 1);
        self.pending = pending;
        self.pending.clear();
        result
    }

    /// The LSN the next frame gets.
    pub fn next_lsn(&self) -> u64 {
        self.next
    }

    /// Writes and syncs `frames`, encoded by the caller (a
    /// [`Committer`](super::commit::Committer), which numbers frames
    /// itself), whose last frame has LSN `last`; returns the last durable
    /// LSN.
    pub fn write_batch(&mut self, frames: &[u8], last: u64) -> Result<u64, Poisoned> {
        if let Some(poisoned) = &self.poisoned {
            return Err(poisoned.clone());
        }
        if frames.is_empty() {
            return Ok(self.durable);
        }
        let sync = self.sync;
        let result = self.disk.append(&self.current, frames).and_then(|()| {
            if sync {
                self.disk.sync(&self.current)
            } else {
                Ok(())
            }
        });
        if let Err(error) = result {
            return Err(self.poison(format!("{}: {error}", self.current)));
        }
        self.written += frames.len() as u64;
        self.durable = last;
        self.next = self.next.max(last + 1);
        if self.written >= self.segment_bytes {
            let name = segment_name(last + 1);
            if let Err(error) = self.disk.create(&name) {
                return Err(self.poison(format!("{name}: {error}")));
            }
            self.current = name;
            self.earlier += self.written;
            self.written = 0;
            self.segment_count += 1;
        }
        Ok(self.durable)
    }

    fn poison(&mut self, what: String) -> Poisoned {
        let poisoned = Poisoned(what);
        tracing::error!(%poisoned, "the log is poisoned");
        self.poisoned = Some(poisoned.clone());
        poisoned
    }

    /// The last LSN known to be durable.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// Deletes the segments whose every frame is at or before `lsn` (a
    /// snapshot holds them, and no queue or retention needs them), never the
    /// one being written; how many.
    pub fn remove_through(&mut self, lsn: u64) -> io::Result<usize> {
        let mut segments: Vec<(u64, String)> = self
            .disk
            .list()?
            .into_iter()
            .filter_map(|n| Some((n.strip_suffix(SUFFIX)?.parse().ok()?, n)))
            .collect();
        segments.sort();
        let mut removed = 0;
        for pair in segments.windows(2) {
            // A segment ends where the next begins.
            let ((_, name), (next, _)) = (&pair[0], &pair[1]);
            if *next > lsn + 1 || *name == self.current {
                break;
            }
            let len = self.disk.len(name).unwrap_or(0);
            self.disk.remove(name)?;
            self.earlier = self.earlier.saturating_sub(len);
            self.segment_count -= 1;
            removed += 1;
        }
        Ok(removed)
    }

    /// Segment files on disk (counted, not listed: read on every commit).
    pub fn segment_count(&self) -> usize {
        self.segment_count
    }

    /// Whether commits sync (the default) or only write.
    pub fn set_sync(&mut self, sync: bool) {
        self.sync = sync;
    }

    /// Bytes in the log's segments.
    pub fn bytes(&self) -> u64 {
        self.earlier + self.written
    }

    fn count_earlier(&self) -> u64 {
        self.segments()
            .unwrap_or_default()
            .iter()
            .filter(|name| **name != self.current)
            .filter_map(|name| self.disk.len(name).ok())
            .sum()
    }

    /// The segments on disk, oldest first.
    pub fn segments(&self) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = self
            .disk
            .list()?
            .into_iter()
            .filter(|n| n.ends_with(SUFFIX))
            .collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::disk::FsDisk;
    use crate::storage::disk::crash::CrashDisk;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn payloads(frames: &[Recovered]) -> Vec<Vec<u8>> {
        frames.iter().map(|f| f.payload().to_vec()).collect()
    }

    #[test]
    fn frames_survive_a_reopen_across_segments_on_a_real_directory() {
        let dir = std::env::temp_dir().join(format!("eventsys-wal-{}", uuid::Uuid::new_v4()));
        let written: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; i as usize]).collect();
        {
            let (mut wal, recovered) = Wal::open(FsDisk::new(&dir).unwrap(), 200).unwrap();
            assert!(recovered.is_empty());
            for (i, p) in written.iter().enumerate() {
                assert_eq!(wal.append(7, p).unwrap(), i as u64 + 1);
                if i % 3 == 0 {
                    wal.commit().unwrap();
                }
            }
            assert_eq!(wal.commit().unwrap(), 50);
            assert!(wal.segments().unwrap().len() > 3, "small segments rotate");
        }
        let (mut wal, recovered) = Wal::open(FsDisk::new(&dir).unwrap(), 200).unwrap();
        assert_eq!(payloads(&recovered), written);
        assert!(recovered.iter().all(|f| f.kind == 7));
        assert_eq!(
            recovered.iter().map(|f| f.lsn).collect::<Vec<_>>(),
            (1..=50).collect::<Vec<_>>()
        );
        assert_eq!(wal.append(7, b"more").unwrap(), 51, "LSNs continue");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn segments_wholly_before_a_position_are_removed_and_the_rest_still_opens() {
        let disk = Arc::new(CrashDisk::default());
        let (mut wal, _) = Wal::open(disk.clone(), 40).unwrap();
        for i in 0..10u8 {
            wal.append(1, &[i; 30]).unwrap();
            wal.commit().unwrap();
        }
        let before = wal.segments().unwrap().len();
        // Two 39-byte frames fill a 40-byte segment: 1-2 and 3-4 go.
        assert_eq!(wal.remove_through(4).unwrap(), 2);
        assert_eq!(wal.segments().unwrap().len(), before - 2);
        assert_eq!(wal.remove_through(4).unwrap(), 0);
        drop(wal);
        // From the start, frames are missing; after a snapshot at 6, none.
        assert!(matches!(
            Wal::open(disk.clone(), 40),
            Err(OpenError::Gap {
                expected: 1,
                found: 5,
                ..
            })
        ));
        let (mut wal, recovered) = Wal::open_after(disk.clone(), 40, 6).unwrap();
        assert_eq!(
            recovered.iter().map(|f| f.lsn).collect::<Vec<_>>(),
            [7, 8, 9, 10]
        );
        assert_eq!(wal.append(1, b"next").unwrap(), 11);
    }

    #[test]
    fn damage_in_a_middle_segment_stops_the_open_naming_the_file_and_offset() {
        let disk = Arc::new(CrashDisk::default());
        let (mut wal, _) = Wal::open(disk.clone(), 40).unwrap();
        for i in 0..10u8 {
            wal.append(1, &[i; 30]).unwrap();
            wal.commit().unwrap();
        }
        let segments = wal.segments().unwrap();
        let middle = &segments[1];
        let mut bytes = disk.read(middle).unwrap();
        bytes[12] ^= 0xff;
        disk.truncate(middle, 0).unwrap();
        disk.append(middle, &bytes).unwrap();
        disk.sync(middle).unwrap();
        let error = Wal::open(disk.clone(), 40).err().expect("refused");
        let message = error.to_string();
        assert!(message.starts_with(middle.as_str()), "{message}");
        assert!(message.contains("offset 0"), "{message}");
        // A snapshot past it holds its frames: it is kept for an older
        // snapshot, and not read.
        let (_, recovered) = Wal::open_after(disk.clone(), 40, 4).unwrap();
        assert_eq!(
            recovered.iter().map(|f| f.lsn).collect::<Vec<_>>(),
            [5, 6, 7, 8, 9, 10]
        );
    }

    #[derive(Clone, Debug)]
    enum Op {
        Append(Vec<u8>),
        Commit,
        FailWrite,
        FailSync,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => prop::collection::vec(any::<u8>(), 0..60).prop_map(Op::Append),
            3 => Just(Op::Commit),
            1 => Just(Op::FailWrite),
            1 => Just(Op::FailSync),
        ]
    }

    proptest! {
        /// Whatever was committed survives a crash that loses or tears what
        /// was not; what survives is a prefix of what was appended; and
        /// after a failed write or sync nothing more is committed.
        #[test]
        fn the_committed_prefix_survives_a_crash(
            ops in prop::collection::vec(op(), 1..60),
            keep in prop::collection::vec(any::<prop::sample::Index>(), 4),
            garbage in prop::collection::vec(any::<u8>(), 0..12),
            segment_bytes in 50u64..400,
        ) {
            let disk = Arc::new(CrashDisk::default());
            let (mut wal, _) = Wal::open(disk.clone(), segment_bytes).unwrap();
            let mut appended: Vec<Vec<u8>> = Vec::new();
            let mut acked = 0;
            let mut poisoned = false;
            for op in ops {
                match op {
                    Op::Append(p) => match wal.append(3, &p) {
                        Ok(lsn) => {
                            prop_assert!(!poisoned);
                            prop_assert_eq!(lsn, appended.len() as u64 + 1);
                            appended.push(p);
                        }
                        Err(_) => prop_assert!(poisoned),
                    },
                    Op::Commit => match wal.commit() {
                        Ok(durable) => {
                            prop_assert!(!poisoned);
                            prop_assert_eq!(durable, appended.len() as u64);
                            acked = appended.len();
                        }
                        Err(_) => poisoned = true,
                    },
                    Op::FailWrite => disk.fail_write(0),
                    Op::FailSync => disk.fail_sync(0),
                }
            }
            let mut cuts = keep.iter().cycle();
            let crashed = disk.crash(|len| cuts.next().map_or(0, |i| i.index(len + 1)), &garbage);
            let (_, recovered) = Wal::open(crashed, segment_bytes).unwrap();
            let got = payloads(&recovered);
            prop_assert!(got.len() >= acked, "lost committed frames: {} < {}", got.len(), acked);
            prop_assert_eq!(&got[..], &appended[..got.len()]);
        }
    }
}

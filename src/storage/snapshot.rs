//! Snapshots: the whole state as of a log position, so that a restart
//! reads one file and the log after it instead of the log from the start.
//!
//! A snapshot is written to `<lsn>.snap.tmp`, synced, then renamed to
//! `<lsn>.snap` (`lsn`: the last log frame it includes), so a crash leaves
//! either no snapshot of that position or a whole one. Its last 16 bytes
//! are a footer: the body's length (u64 LE), its CRC32 (u32 LE) and
//! [`MAGIC`]. [`latest`] takes the newest snapshot whose footer checks and
//! says which it passed over; the newest [`KEEP`] are kept.

use std::io;

use super::disk::Disk;
use super::frame::{self, Damage, Frame};

const SUFFIX: &str = ".snap";
const TMP: &str = ".snap.tmp";
pub const MAGIC: [u8; 4] = *b"ESNP";
const FOOTER: usize = 16;

/// Snapshots kept: the newest, and one before it in case it is damaged.
pub const KEEP: usize = 2;

pub fn name(lsn: u64) -> String {
    format!("{lsn:020}{SUFFIX}")
}

/// Writes `body` as the snapshot at `lsn`, then drops all but the newest
/// [`KEEP`].
pub fn write(disk: &impl Disk, lsn: u64, body: &[u8]) -> io::Result<()> {
    let mut writer = Writer::create(disk, lsn)?;
    writer.buffer().extend_from_slice(body);
    writer.finish()?;
    publish(disk, lsn)
}

/// A snapshot being written, a buffer at a time, to `<lsn>.snap.tmp`: the
/// state is streamed to disk as it is copied, never held whole in memory.
pub struct Writer<'d, D: Disk> {
    disk: &'d D,
    tmp: String,
    hasher: crc32fast::Hasher,
    len: u64,
    buffer: Vec<u8>,
}

/// Bytes gathered before they are written out.
const FLUSH_BYTES: usize = 1 << 20;

impl<'d, D: Disk> Writer<'d, D> {
    pub fn create(disk: &'d D, lsn: u64) -> io::Result<Self> {
        let tmp = format!("{lsn:020}{TMP}");
        if disk.list()?.contains(&tmp) {
            disk.remove(&tmp)?;
        }
        disk.create(&tmp)?;
        Ok(Self {
            disk,
            tmp,
            hasher: crc32fast::Hasher::new(),
            len: 0,
            buffer: Vec::with_capacity(FLUSH_BYTES + FLUSH_BYTES / 4),
        })
    }

    /// Where the next frames go; [`Writer::spill`] writes them out.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.buffer
    }

    /// Writes out what is buffered once there is enough of it.
    pub fn spill(&mut self) -> io::Result<()> {
        if self.buffer.len() >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.hasher.update(&self.buffer);
        self.len += self.buffer.len() as u64;
        self.disk.append(&self.tmp, &self.buffer)?;
        self.buffer.clear();
        Ok(())
    }

    /// Writes the rest and the footer, and syncs: the body's length.
    pub fn finish(mut self) -> io::Result<u64> {
        self.flush()?;
        let mut footer = Vec::with_capacity(FOOTER);
        footer.extend_from_slice(&self.len.to_le_bytes());
        footer.extend_from_slice(&self.hasher.clone().finalize().to_le_bytes());
        footer.extend_from_slice(&MAGIC);
        self.disk.append(&self.tmp, &footer)?;
        self.disk.sync(&self.tmp)?;
        Ok(self.len)
    }
}

/// Makes the finished snapshot at `lsn` the newest (an atomic rename),
/// then drops all but the newest [`KEEP`].
pub fn publish(disk: &impl Disk, lsn: u64) -> io::Result<()> {
    disk.rename(&format!("{lsn:020}{TMP}"), &name(lsn))?;
    for (_, old) in snapshots(disk)?.into_iter().skip(KEEP) {
        disk.remove(&old)?;
    }
    Ok(())
}

/// The snapshots on disk, newest first.
fn snapshots(disk: &impl Disk) -> io::Result<Vec<(u64, String)>> {
    let mut found: Vec<(u64, String)> = disk
        .list()?
        .into_iter()
        .filter_map(|n| Some((n.strip_suffix(SUFFIX)?.parse().ok()?, n)))
        .collect();
    found.sort_by(|a, b| b.cmp(a));
    Ok(found)
}

/// A snapshot whose footer checks, found by [`latest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The last log frame it includes.
    pub lsn: u64,
    pub file: String,
    /// Its body's length (the file less its footer).
    pub len: u64,
}

/// Bytes read at a time: a snapshot is streamed, never held whole, so a
/// restart does not first fault in a copy of the file.
const READ_BYTES: usize = 8 << 20;

/// Fills as much of `buf` as the file has from `offset` on; how much.
fn fill(disk: &impl Disk, file: &str, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match disk.read_at(file, offset + filled as u64, &mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// The body length of `file` if its footer checks (read through once).
fn check(disk: &impl Disk, file: &str) -> io::Result<Option<u64>> {
    let Some(body) = disk.len(file)?.checked_sub(FOOTER as u64) else {
        return Ok(None);
    };
    let mut footer = [0; FOOTER];
    if fill(disk, file, body, &mut footer)? != FOOTER || footer[12..] != MAGIC {
        return Ok(None);
    }
    let (len, crc) = footer.split_at(8);
    let len = u64::from_le_bytes(len.try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(crc[..4].try_into().unwrap_or_default());
    if len != body {
        return Ok(None);
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0; READ_BYTES];
    let mut offset = 0;
    while offset < body {
        let want = buf.len().min((body - offset) as usize);
        let n = fill(disk, file, offset, &mut buf[..want])?;
        if n == 0 {
            return Ok(None);
        }
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    Ok((hasher.finalize() == crc).then_some(body))
}

/// The newest snapshot whose footer checks; a newer one that does not
/// check is passed over with a warning, and a leftover `.tmp` (a crash
/// mid-write) is removed.
pub fn latest(disk: &impl Disk) -> io::Result<Option<Found>> {
    for leftover in disk.list()?.into_iter().filter(|n| n.ends_with(TMP)) {
        tracing::warn!(file = %leftover, "removing a snapshot left half-written");
        disk.remove(&leftover)?;
    }
    for (lsn, file) in snapshots(disk)? {
        match check(disk, &file)? {
            Some(len) => return Ok(Some(Found { lsn, file, len })),
            None => tracing::warn!(%file, "passing over a snapshot whose checksum fails"),
        }
    }
    Ok(None)
}

/// Why a snapshot's frames could not be read.
#[derive(Debug)]
pub enum ReadError<E> {
    Io(io::Error),
    /// A frame that its checked body cannot hold (a bad length, or one cut
    /// short by the end).
    Damage(Damage),
    /// What `each` returned.
    Stopped(E),
}

/// Reads the body of `found` a buffer at a time and calls `each` with the
/// buffer and the whole frames in it (a frame's offsets are the buffer's;
/// `base` is where the buffer starts in the file).
pub fn read_frames<E>(
    disk: &impl Disk,
    found: &Found,
    each: impl FnMut(&[u8], &[Frame], u64) -> Result<(), E>,
) -> Result<(), ReadError<E>> {
    read_frames_by(disk, found, READ_BYTES, each)
}

/// [`read_frames`], `buffer` bytes at a time (at first).
fn read_frames_by<E>(
    disk: &impl Disk,
    found: &Found,
    buffer: usize,
    mut each: impl FnMut(&[u8], &[Frame], u64) -> Result<(), E>,
) -> Result<(), ReadError<E>> {
    let mut buf = vec![0; buffer.max(1)];
    // Bytes at the front of `buf` carried from the last read: the start
    // of a frame it cut.
    let mut kept = 0;
    let mut base = 0;
    loop {
        let start = base + kept as u64;
        let want = (buf.len() - kept).min((found.len - start) as usize);
        let n =
            fill(disk, &found.file, start, &mut buf[kept..kept + want]).map_err(ReadError::Io)?;
        if n == 0 {
            if kept > 0 {
                return Err(ReadError::Damage(Damage {
                    offset: base as usize,
                    reason: "a frame cut short inside a whole snapshot",
                }));
            }
            return Ok(());
        }
        let filled = kept + n;
        let (frames, whole) = frame::split(&buf[..filled]).map_err(|damage| {
            ReadError::Damage(Damage {
                offset: damage.offset + base as usize,
                ..damage
            })
        })?;
        each(&buf[..whole], &frames, base).map_err(ReadError::Stopped)?;
        buf.copy_within(whole..filled, 0);
        kept = filled - whole;
        base += whole as u64;
        if kept == buf.len() {
            // One frame larger than the buffer: make room for it.
            buf.resize(buf.len() * 2, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::disk::crash::CrashDisk;

    /// The newest whole snapshot's LSN and body, read back frame by frame.
    fn read_latest(disk: &impl Disk) -> Option<(u64, Vec<Vec<u8>>)> {
        let found = latest(disk).unwrap()?;
        Some((found.lsn, read_by(disk, &found, READ_BYTES).unwrap()))
    }

    /// The payloads of `found`, read `buffer` bytes at a time, each with
    /// the offset its frame is at in the file.
    fn read_by(disk: &impl Disk, found: &Found, buffer: usize) -> Result<Vec<Vec<u8>>, Damage> {
        let mut payloads = Vec::new();
        let read = read_frames_by(disk, found, buffer, |bytes, frames, _| {
            payloads.extend(frames.iter().map(|f| bytes[f.payload.clone()].to_vec()));
            Ok::<_, ()>(())
        });
        match read {
            Ok(()) => Ok(payloads),
            Err(ReadError::Damage(damage)) => Err(damage),
            Err(ReadError::Io(e)) => panic!("{e}"),
            Err(ReadError::Stopped(())) => unreachable!(),
        }
    }

    proptest::proptest! {
        #[test]
        fn frames_read_back_whole_whatever_the_buffer_cuts(
            payloads in proptest::collection::vec(proptest::collection::vec(0u8..4, 0..40), 0..30),
            buffer in 1usize..64,
        ) {
            let disk = CrashDisk::default();
            let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            write(&disk, 7, &body(&slices)).unwrap();
            let found = latest(&disk).unwrap().unwrap();
            proptest::prop_assert_eq!(read_by(&disk, &found, buffer).unwrap(), payloads);
        }
    }

    #[test]
    fn a_whole_snapshot_whose_last_frame_is_cut_is_damage_at_its_offset() {
        let disk = CrashDisk::default();
        let mut cut = body(&[b"first", b"second"]);
        cut.truncate(cut.len() - 2);
        write(&disk, 7, &cut).unwrap();
        let found = latest(&disk).unwrap().unwrap();
        let damage = read_by(&disk, &found, 4).unwrap_err();
        assert_eq!(damage.offset, frame::HEADER + 1 + b"first".len());
        assert_eq!(damage.reason, "a frame cut short inside a whole snapshot");
    }

    fn body(payloads: &[&[u8]]) -> Vec<u8> {
        let mut body = Vec::new();
        for (kind, payload) in payloads.iter().enumerate() {
            frame::encode(kind as u8, payload, &mut body);
        }
        body
    }

    #[test]
    fn the_newest_whole_snapshot_is_read_and_two_are_kept() {
        let disk = CrashDisk::default();
        assert_eq!(read_latest(&disk), None);
        for lsn in [10, 20, 30] {
            write(
                &disk,
                lsn,
                &body(&[b"state at", lsn.to_string().as_bytes()]),
            )
            .unwrap();
        }
        assert_eq!(
            read_latest(&disk),
            Some((30, vec![b"state at".to_vec(), b"30".to_vec()]))
        );
        let mut names = disk.list().unwrap();
        names.sort();
        assert_eq!(names, [name(20), name(30)]);
    }

    #[test]
    fn a_half_written_snapshot_is_passed_over_for_the_one_before() {
        let disk = CrashDisk::default();
        write(&disk, 10, &body(&[b"good"])).unwrap();
        // A crash during the next one's write: a .tmp with part of it.
        disk.create(&format!("{:020}{TMP}", 20)).unwrap();
        disk.append(&format!("{:020}{TMP}", 20), b"half").unwrap();
        // And a renamed one that is damaged all the same.
        write(&disk, 30, &body(&[b"will be damaged"])).unwrap();
        let damaged = disk.read(&name(30)).unwrap();
        disk.truncate(&name(30), (damaged.len() - 3) as u64)
            .unwrap();
        let crashed = disk.crash(|n| n, &[]);
        assert_eq!(read_latest(&crashed), Some((10, vec![b"good".to_vec()])));
        assert!(
            !crashed.list().unwrap().iter().any(|n| n.ends_with(TMP)),
            "the leftover is removed"
        );
    }
}

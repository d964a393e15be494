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

/// The body of `bytes` if its footer checks.
fn body(bytes: &[u8]) -> Option<&[u8]> {
    let split = bytes.len().checked_sub(FOOTER)?;
    let (body, footer) = bytes.split_at(split);
    let len = u64::from_le_bytes(footer[..8].try_into().ok()?);
    let crc = u32::from_le_bytes(footer[8..12].try_into().ok()?);
    (footer[12..] == MAGIC && len == body.len() as u64 && crc32fast::hash(body) == crc)
        .then_some(body)
}

/// The newest snapshot whose footer checks, as its LSN and body; a newer
/// one that does not check is passed over with a warning, and a leftover
/// `.tmp` (a crash mid-write) is removed.
pub fn latest(disk: &impl Disk) -> io::Result<Option<(u64, Vec<u8>)>> {
    for leftover in disk.list()?.into_iter().filter(|n| n.ends_with(TMP)) {
        tracing::warn!(file = %leftover, "removing a snapshot left half-written");
        disk.remove(&leftover)?;
    }
    for (lsn, file) in snapshots(disk)? {
        let mut bytes = disk.read(&file)?;
        match body(&bytes).map(<[u8]>::len) {
            Some(len) => {
                bytes.truncate(len);
                return Ok(Some((lsn, bytes)));
            }
            None => tracing::warn!(%file, "passing over a snapshot whose checksum fails"),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::disk::crash::CrashDisk;

    #[test]
    fn the_newest_whole_snapshot_is_read_and_two_are_kept() {
        let disk = CrashDisk::default();
        assert_eq!(latest(&disk).unwrap(), None);
        for lsn in [10, 20, 30] {
            write(&disk, lsn, format!("state at {lsn}").as_bytes()).unwrap();
        }
        assert_eq!(latest(&disk).unwrap(), Some((30, b"state at 30".to_vec())));
        let mut names = disk.list().unwrap();
        names.sort();
        assert_eq!(names, [name(20), name(30)]);
    }

    #[test]
    fn a_half_written_snapshot_is_passed_over_for_the_one_before() {
        let disk = CrashDisk::default();
        write(&disk, 10, b"good").unwrap();
        // A crash during the next one's write: a .tmp with part of it.
        disk.create(&format!("{:020}{TMP}", 20)).unwrap();
        disk.append(&format!("{:020}{TMP}", 20), b"half").unwrap();
        // And a renamed one that is damaged all the same.
        write(&disk, 30, b"will be damaged").unwrap();
        let damaged = disk.read(&name(30)).unwrap();
        disk.truncate(&name(30), (damaged.len() - 3) as u64)
            .unwrap();
        let crashed = disk.crash(|n| n, &[]);
        assert_eq!(latest(&crashed).unwrap(), Some((10, b"good".to_vec())));
        assert!(
            !crashed.list().unwrap().iter().any(|n| n.ends_with(TMP)),
            "the leftover is removed"
        );
    }
}

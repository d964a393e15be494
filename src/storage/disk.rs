//! The files of a data directory, behind a trait, so that the log can be
//! tested against a disk that loses what was not synced.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A flat directory of files that are appended to and synced.
pub trait Disk: Send + Sync + 'static {
    /// The names of the files, in no order.
    fn list(&self) -> io::Result<Vec<String>>;
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Reads into `buf` from `offset` on; how many bytes it read (0 at the
    /// end), so a large file can be read a buffer at a time.
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let bytes = self.read(name)?;
        let start = bytes
            .len()
            .min(usize::try_from(offset).unwrap_or(usize::MAX));
        let n = buf.len().min(bytes.len() - start);
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        Ok(n)
    }
    /// Makes an empty file; it exists after a crash once this returns.
    fn create(&self, name: &str) -> io::Result<()>;
    /// Appends to a file; the bytes may be lost in a crash until synced.
    fn append(&self, name: &str, bytes: &[u8]) -> io::Result<()>;
    /// Makes what was appended to the file survive a crash.
    fn sync(&self, name: &str) -> io::Result<()>;
    /// Cuts the file to `len` bytes, durably.
    fn truncate(&self, name: &str, len: u64) -> io::Result<()>;
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Renames a synced file, durably and atomically: after a crash there
    /// is either the old name or the new one.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// The file's length in bytes.
    fn len(&self, name: &str) -> io::Result<u64> {
        self.read(name).map(|bytes| bytes.len() as u64)
    }
}

/// A shared disk is a disk (the log's writer and a test can both hold it).
impl<D: Disk> Disk for std::sync::Arc<D> {
    fn list(&self) -> io::Result<Vec<String>> {
        (**self).list()
    }
    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        (**self).read(name)
    }
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        (**self).read_at(name, offset, buf)
    }
    fn create(&self, name: &str) -> io::Result<()> {
        (**self).create(name)
    }
    fn append(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        (**self).append(name, bytes)
    }
    fn sync(&self, name: &str) -> io::Result<()> {
        (**self).sync(name)
    }
    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        (**self).truncate(name, len)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        (**self).remove(name)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        (**self).rename(from, to)
    }
    fn len(&self, name: &str) -> io::Result<u64> {
        (**self).len(name)
    }
}

/// A real directory.
pub struct FsDisk {
    dir: PathBuf,
    /// Open handles of the files being appended to.
    open: Mutex<HashMap<String, File>>,
}

impl FsDisk {
    pub fn new(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            open: Mutex::new(HashMap::new()),
        })
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn with_file<R>(
        &self,
        name: &str,
        f: impl FnOnce(&mut File) -> io::Result<R>,
    ) -> io::Result<R> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if !open.contains_key(name) {
            let file = OpenOptions::new().append(true).open(self.dir.join(name))?;
            open.insert(name.to_string(), file);
        }
        match open.get_mut(name) {
            Some(file) => f(file),
            None => Err(io::Error::other("the file handle vanished")),
        }
    }
}

impl Disk for FsDisk {
    fn len(&self, name: &str) -> io::Result<u64> {
        Ok(fs::metadata(self.dir.join(name))?.len())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        fs::read(self.dir.join(name))
    }

    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        File::open(self.dir.join(name))?.read_at(buf, offset)
    }

    fn create(&self, name: &str) -> io::Result<()> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.dir.join(name))?
            .sync_all()?;
        self.sync_dir()
    }

    fn append(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.with_file(name, |file| file.write_all(bytes))
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        self.with_file(name, |file| file.sync_data())
    }

    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        let file = OpenOptions::new().write(true).open(self.dir.join(name))?;
        file.set_len(len)?;
        file.sync_all()
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        fs::remove_file(self.dir.join(name))?;
        self.sync_dir()
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(from);
        fs::rename(self.dir.join(from), self.dir.join(to))?;
        self.sync_dir()
    }
}

#[cfg(test)]
pub mod crash {
    //! A disk that keeps synced and unsynced bytes apart, can lose or tear
    //! the unsynced ones in a simulated crash, and can fail the Nth write
    //! or sync.

    use super::*;
    use std::collections::BTreeMap;

    #[derive(Clone, Default)]
    struct MemFile {
        durable: Vec<u8>,
        pending: Vec<u8>,
    }

    #[derive(Default)]
    struct State {
        files: BTreeMap<String, MemFile>,
        writes: usize,
        syncs: usize,
        fail_write: Option<usize>,
        fail_sync: Option<usize>,
    }

    #[derive(Default)]
    pub struct CrashDisk {
        state: Mutex<State>,
    }

    impl CrashDisk {
        fn state(&self) -> std::sync::MutexGuard<'_, State> {
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// The `n`th write from now (0: the next) fails, having written
        /// only part of its bytes.
        pub fn fail_write(&self, n: usize) {
            let mut state = self.state();
            state.fail_write = Some(state.writes + n);
        }

        /// Syncs done so far (failed ones included).
        pub fn syncs(&self) -> usize {
            self.state().syncs
        }

        /// The `n`th sync from now fails, syncing nothing.
        pub fn fail_sync(&self, n: usize) {
            let mut state = self.state();
            state.fail_sync = Some(state.syncs + n);
        }

        /// The disk after a crash: each file keeps what was synced and the
        /// first `keep(pending length)` unsynced bytes, then `garbage`.
        pub fn crash(&self, mut keep: impl FnMut(usize) -> usize, garbage: &[u8]) -> CrashDisk {
            let files = self
                .state()
                .files
                .iter()
                .map(|(name, file)| {
                    let mut durable = file.durable.clone();
                    if !file.pending.is_empty() {
                        let kept = keep(file.pending.len()).min(file.pending.len());
                        durable.extend_from_slice(&file.pending[..kept]);
                        if kept < file.pending.len() {
                            durable.extend_from_slice(garbage);
                        }
                    }
                    let file = MemFile {
                        durable,
                        pending: Vec::new(),
                    };
                    (name.clone(), file)
                })
                .collect();
            CrashDisk {
                state: Mutex::new(State {
                    files,
                    ..State::default()
                }),
            }
        }
    }

    fn missing(name: &str) -> io::Error {
        io::Error::new(io::ErrorKind::NotFound, format!("no file {name}"))
    }

    impl Disk for CrashDisk {
        fn list(&self) -> io::Result<Vec<String>> {
            Ok(self.state().files.keys().cloned().collect())
        }

        fn read(&self, name: &str) -> io::Result<Vec<u8>> {
            let state = self.state();
            let file = state.files.get(name).ok_or_else(|| missing(name))?;
            Ok([file.durable.as_slice(), file.pending.as_slice()].concat())
        }

        fn create(&self, name: &str) -> io::Result<()> {
            self.state()
                .files
                .insert(name.to_string(), MemFile::default());
            Ok(())
        }

        fn append(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
            let mut state = self.state();
            let failing = state.fail_write == Some(state.writes);
            state.writes += 1;
            let file = state.files.get_mut(name).ok_or_else(|| missing(name))?;
            if failing {
                file.pending.extend_from_slice(&bytes[..bytes.len() / 2]);
                return Err(io::Error::other("injected write failure"));
            }
            file.pending.extend_from_slice(bytes);
            Ok(())
        }

        fn sync(&self, name: &str) -> io::Result<()> {
            let mut state = self.state();
            let failing = state.fail_sync == Some(state.syncs);
            state.syncs += 1;
            if failing {
                return Err(io::Error::other("injected fsync failure"));
            }
            let file = state.files.get_mut(name).ok_or_else(|| missing(name))?;
            let pending = std::mem::take(&mut file.pending);
            file.durable.extend_from_slice(&pending);
            Ok(())
        }

        fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
            let mut state = self.state();
            let file = state.files.get_mut(name).ok_or_else(|| missing(name))?;
            let mut all = [file.durable.as_slice(), file.pending.as_slice()].concat();
            all.truncate(len as usize);
            *file = MemFile {
                durable: all,
                pending: Vec::new(),
            };
            Ok(())
        }

        fn remove(&self, name: &str) -> io::Result<()> {
            self.state().files.remove(name);
            Ok(())
        }

        fn rename(&self, from: &str, to: &str) -> io::Result<()> {
            let mut state = self.state();
            let file = state.files.remove(from).ok_or_else(|| missing(from))?;
            state.files.insert(to.to_string(), file);
            Ok(())
        }
    }
}

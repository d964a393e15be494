//! One server per data directory: an exclusive lock on `DIR/LOCK`, held
//! for as long as the server runs and released by the kernel when the
//! process ends, however it ends (`kill -9` included).

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};

/// The lock on a data directory; the directory is free again once dropped.
#[derive(Debug)]
pub struct DirLock {
    dir: PathBuf,
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the data directory {} is in use by another eventsys; stop it, or use another \
         --data-dir",
        .0.display()
    )]
    Held(PathBuf),
    #[error("cannot lock the data directory {}: {error}", dir.display())]
    Io { dir: PathBuf, error: io::Error },
}

impl DirLock {
    /// Creates `dir` if need be and locks it, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let failed = |error| LockError::Io {
            dir: dir.to_path_buf(),
            error,
        };
        fs::create_dir_all(dir).map_err(failed)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(failed)?;
        match file.try_lock() {
            Ok(()) => Ok(Self {
                dir: dir.to_path_buf(),
                _file: file,
            }),
            Err(TryLockError::WouldBlock) => Err(LockError::Held(dir.to_path_buf())),
            Err(TryLockError::Error(e)) => Err(failed(e)),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_directory_is_refused_naming_it_until_the_first_is_dropped() {
        let dir = std::env::temp_dir().join(format!("eventsys-lock-{}", uuid::Uuid::new_v4()));
        let first = DirLock::acquire(&dir).unwrap();
        let refused = DirLock::acquire(&dir).unwrap_err();
        assert!(matches!(refused, LockError::Held(_)));
        assert!(
            refused.to_string().contains(&dir.display().to_string()),
            "{refused}"
        );
        drop(first);
        let again = DirLock::acquire(&dir).unwrap();
        assert_eq!(again.dir(), dir);
        drop(again);
        fs::remove_dir_all(&dir).unwrap();
    }
}

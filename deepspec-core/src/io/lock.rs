//! An exclusive OS lock on a folder that one process writes (a cache being prepared, a
//! training run's output, an eval's report and plots). The lock is `flock` on a small file
//! in the folder: the OS drops it when the process ends, even by `kill -9`, so a stale lock
//! never needs cleaning up, and a second process gets a clear error instead of interleaving
//! its writes with the first one's.

use anyhow::Context;
use std::fs::File;
use std::path::Path;

/// A held lock; dropping it releases the lock (the file stays, empty, for the next run).
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
}

/// Takes the lock file `dir/lock_name` (the folder must exist). When another process holds
/// it, fails with "`dir/lock_name`: another `holder` is writing this folder; ..." so the user
/// knows which command to wait for.
pub fn lock_folder(dir: &Path, lock_name: &str, holder: &str) -> anyhow::Result<FolderLock> {
    let path = dir.join(lock_name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(FolderLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "{}: another {holder} is writing {}; wait for it to finish or stop it (the lock is released when that process ends)",
            path.display(),
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_folder_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_folder(dir.path(), ".test.lock", "`deepspec test`").unwrap();
        let err = lock_folder(dir.path(), ".test.lock", "`deepspec test`").unwrap_err();
        let text = err.to_string();
        assert!(text.contains(".test.lock"), "{text}");
        assert!(
            text.contains("another `deepspec test` is writing"),
            "{text}"
        );
        drop(first);
        lock_folder(dir.path(), ".test.lock", "`deepspec test`").unwrap();
    }
}

//! Replacing a file atomically: write it under a temporary sibling (`<name>.tmp`, same folder
//! so the rename never crosses a file system), fsync, rename it over the target, fsync the
//! folder. A reader, or a run resumed after a kill, sees the old file or the new one, never
//! half of one; `deepspec prepare` deletes stray `*.tmp` files when it resumes.
//!
//! [`write_atomically`] writes a buffer; [`PendingFile`] is the same protocol for writers that
//! stream (the Parquet shard writer), so both share the temporary name and the commit.

use crate::cache::CacheError;
use crate::LoadError;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A failed atomic write: the file (the temporary or the destination) and the I/O error.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl WriteError {
    fn new(path: &Path, source: std::io::Error) -> Self {
        WriteError {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<WriteError> for LoadError {
    fn from(e: WriteError) -> Self {
        LoadError::Io {
            path: e.path,
            source: e.source,
        }
    }
}

impl From<WriteError> for CacheError {
    fn from(e: WriteError) -> Self {
        CacheError::Io {
            path: e.path,
            source: e.source,
        }
    }
}

/// Writes `bytes` to `path` atomically (see the module doc).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let (pending, mut file) = PendingFile::create(path)?;
    file.write_all(bytes)
        .map_err(|e| WriteError::new(pending.tmp(), e))?;
    pending.commit(file)
}

/// The temporary name a file is written under before it is renamed into place.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// A file being written under its temporary name; [`PendingFile::commit`] puts it in place.
/// Dropping it without committing leaves only the `.tmp` file behind.
#[derive(Debug)]
pub struct PendingFile {
    tmp: PathBuf,
    path: PathBuf,
}

impl PendingFile {
    /// Creates `path`'s temporary sibling and hands out its file to write into.
    pub fn create(path: &Path) -> Result<(Self, File), WriteError> {
        let tmp = tmp_path(path);
        let file = File::create(&tmp).map_err(|e| WriteError::new(&tmp, e))?;
        Ok((
            PendingFile {
                tmp,
                path: path.to_path_buf(),
            },
            file,
        ))
    }

    /// The temporary file's path (for error messages while writing).
    pub fn tmp(&self) -> &Path {
        &self.tmp
    }

    /// The destination.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `file` (the one [`PendingFile::create`] gave, fully written and flushed) durable
    /// and renames it over the destination.
    pub fn commit(self, file: File) -> Result<(), WriteError> {
        file.sync_all().map_err(|e| WriteError::new(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| WriteError::new(&self.path, e))?;
        sync_dir(&self.path);
        Ok(())
    }
}

/// Makes a rename durable (best effort: not every platform can fsync a folder).
fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomically(&path, b"old").unwrap();
        write_atomically(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!tmp_path(&path).exists());
    }

    #[test]
    fn an_uncommitted_file_leaves_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.parquet");
        write_atomically(&path, b"whole").unwrap();
        let (pending, mut file) = PendingFile::create(&path).unwrap();
        file.write_all(b"half").unwrap();
        drop((pending, file));
        assert_eq!(std::fs::read(&path).unwrap(), b"whole");
        assert!(tmp_path(&path).exists());
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-folder").join("a.json");
        let err = write_atomically(&path, b"x").unwrap_err().to_string();
        assert!(err.contains("missing-folder"), "{err}");
    }
}

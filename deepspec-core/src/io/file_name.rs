//! File names that come from file contents (a cache manifest's shard list, a reference cache's
//! shards, an index's `weight_map`, a checkpoint's `step_latest` link). Each must name a file
//! directly inside the folder it was read from, so that no file can make deepspec read,
//! overwrite or delete anything elsewhere.

use std::path::{Path, PathBuf};

/// A name that would leave its folder (or name the folder itself).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{name}` is not a plain file name inside the folder (no `/` or `\\`, not `.` or `..`, not absolute)")]
pub struct NotAPlainFileName {
    pub name: String,
}

/// Checks that `name` is a plain file name: not empty, no path separator (`/` or `\`), not `.`
/// or `..`, not absolute, no NUL byte.
pub fn check_plain_file_name(name: &str) -> Result<(), NotAPlainFileName> {
    let plain = !name.is_empty()
        && !name.contains(['/', '\\', '\0'])
        && name != "."
        && name != ".."
        && !Path::new(name).is_absolute();
    if plain {
        Ok(())
    } else {
        Err(NotAPlainFileName {
            name: name.to_string(),
        })
    }
}

/// `dir/name` once `name` is checked to be a plain file name.
pub fn join_plain(dir: &Path, name: &str) -> Result<PathBuf, NotAPlainFileName> {
    check_plain_file_name(name)?;
    Ok(dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_pass_and_escapes_are_refused() {
        for ok in [
            "shard-00000.parquet",
            "model-00001-of-00002.safetensors",
            "step_3",
            ".hidden",
            "a..b",
        ] {
            assert_eq!(check_plain_file_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../outside.parquet",
            "/etc/passwd",
            "sub/file",
            "a\\b",
            "nul\0",
        ] {
            let err = check_plain_file_name(bad).unwrap_err();
            assert_eq!(err.name, bad);
            assert!(err.to_string().contains("not a plain file name"), "{err}");
        }
        assert_eq!(
            join_plain(Path::new("cache"), "shard-00000.parquet").unwrap(),
            Path::new("cache/shard-00000.parquet")
        );
        assert!(join_plain(Path::new("cache"), "../x").is_err());
    }
}

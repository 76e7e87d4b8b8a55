//! Parsed model files, cached by (device, inode, mtime, size): the daemon re-analyses a
//! process whenever its mappings change, and many processes map the same file; a file is
//! parsed again only when it is replaced or rewritten.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    sync::{Arc, Mutex},
};

use super::{open::OpenedFile, profile::ModelProfile};

/// Most files remembered; past it the cache starts over (parsing again is only slower).
const MAX_FILES: usize = 256;

/// What identifies a file's contents without reading them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: i128,
    pub size: u64,
}

impl FileKey {
    /// The key of an open file, from `fstat` on its descriptor.
    pub fn of(file: &OpenedFile) -> Option<FileKey> {
        let meta = file.file.metadata().ok()?;
        Some(FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            size: meta.len(),
        })
    }
}

type Parsed = Result<Option<Arc<ModelProfile>>, String>;

static CACHE: Mutex<Option<HashMap<FileKey, Parsed>>> = Mutex::new(None);

/// The profile of `file`, parsed by `parse` unless a file with the same key was parsed
/// before. Files without a key (fstat failed) are always parsed.
pub fn profile(
    file: &OpenedFile,
    parse: impl FnOnce() -> Result<Option<ModelProfile>, String>,
) -> Result<Option<ModelProfile>, String> {
    let Some(key) = FileKey::of(file) else {
        return parse();
    };
    if let Some(hit) = lock().get_or_insert_with(HashMap::new).get(&key) {
        return hit.clone().map(|p| p.map(|p| (*p).clone()));
    }
    let parsed = parse();
    let stored = parsed.clone().map(|p| p.map(Arc::new));
    let mut cache = lock();
    let cache = cache.get_or_insert_with(HashMap::new);
    if cache.len() >= MAX_FILES {
        cache.clear();
    }
    cache.insert(key, stored);
    parsed
}

fn lock() -> std::sync::MutexGuard<'static, Option<HashMap<FileKey, Parsed>>> {
    CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::open::open_regular;

    #[test]
    fn a_file_is_parsed_once_until_it_changes() {
        let path = std::env::temp_dir().join(format!("infermem-cache-{}", std::process::id()));
        std::fs::write(&path, b"one").unwrap();
        let mut parses = 0;
        for _ in 0..3 {
            let file = open_regular(&path).unwrap();
            profile(&file, || {
                parses += 1;
                Err("not a model".into())
            })
            .unwrap_err();
        }
        assert_eq!(parses, 1);
        // Rewritten with another size: parsed again.
        std::fs::write(&path, b"longer").unwrap();
        let file = open_regular(&path).unwrap();
        profile(&file, || {
            parses += 1;
            Ok(None)
        })
        .unwrap();
        assert_eq!(parses, 2);
        std::fs::remove_file(&path).unwrap();
    }
}

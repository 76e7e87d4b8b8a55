//! Opening untrusted files safely. Model files and the `config.json` beside them belong to
//! whoever runs the model, so infermem first takes an `O_PATH` handle (which opens nothing:
//! no FIFO waits for a writer, no device driver's open runs), checks with `fstat` on it that
//! it is a regular file, then reopens that very inode for reading through `/proc/self/fd`
//! (`O_NONBLOCK|O_CLOEXEC|O_NOCTTY`), caps every read, and parses the file it checked.
//!
//! Files of another process are opened through that process's own view: mapped files through
//! `/proc/<pid>/map_files/<start>-<end>` (which also reaches deleted files), open files through
//! `/proc/<pid>/fd/<n>`, and other paths inside `/proc/<pid>/root`, resolving symlinks within
//! that root (`openat2` with `RESOLVE_IN_ROOT`), so paths in containers are the container's.

use std::{
    collections::HashMap,
    fs::File,
    io::Read as _,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::FileTypeExt as _,
    },
    path::{Path, PathBuf},
};

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// Why a file was not opened or read, and which.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", .path.display())]
pub struct OpenError {
    pub path: PathBuf,
    pub reason: Refusal,
}

/// Why a file was not opened or read.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Io(std::io::Error),
    #[error("{0}, not a regular file: refusing to read it")]
    NotRegular(&'static str),
    #[error("{size} bytes, more than the {limit} bytes accepted")]
    TooLarge { size: u64, limit: u64 },
}

impl OpenError {
    fn new(path: &Path, reason: Refusal) -> OpenError {
        OpenError {
            path: path.to_owned(),
            reason,
        }
    }

    /// Whether the file simply does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(&self.reason, Refusal::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

/// A regular file open for reading, with its size as `fstat` gave it.
#[derive(Debug)]
pub struct OpenedFile {
    pub file: File,
    pub size: u64,
    /// The path it is known by (the process's path for a file opened through /proc).
    pub path: PathBuf,
}

impl OpenedFile {
    /// Reads the whole file, refusing one of more than `limit` bytes (also when it grows
    /// while being read).
    pub fn read_capped(&self, limit: u64) -> Result<Vec<u8>, OpenError> {
        let too_large = |size| OpenError::new(&self.path, Refusal::TooLarge { size, limit });
        if self.size > limit {
            return Err(too_large(self.size));
        }
        let mut bytes = Vec::with_capacity(self.size as usize);
        (&self.file)
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| self.io(source))?;
        if bytes.len() as u64 > limit {
            return Err(too_large(bytes.len() as u64));
        }
        Ok(bytes)
    }

    /// An I/O error on this file.
    pub fn io(&self, source: std::io::Error) -> OpenError {
        OpenError::new(&self.path, Refusal::Io(source))
    }
}

/// Read-only, never blocking, not inherited, never becoming the controlling terminal.
fn read_flags() -> OFlags {
    OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY
}

/// Opens `path` (following symlinks, as model directories use them) without blocking and
/// checks that it is a regular file.
pub fn open_regular(path: &Path) -> Result<OpenedFile, OpenError> {
    open_as(path, path)
}

/// Opens `path`, known to the user as `shown`.
fn open_as(path: &Path, shown: &Path) -> Result<OpenedFile, OpenError> {
    let handle = rustix::fs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| OpenError::new(shown, Refusal::Io(e.into())))?;
    read_regular(handle, shown)
}

/// Reopens the file an `O_PATH` handle holds for reading, if `fstat` on the handle shows a
/// regular file; through `/proc/self/fd`, the reopened file is the same inode.
fn read_regular(handle: OwnedFd, shown: &Path) -> Result<OpenedFile, OpenError> {
    let io = |e: std::io::Error| OpenError::new(shown, Refusal::Io(e));
    let handle = File::from(handle);
    let kind = handle.metadata().map_err(io)?.file_type();
    if !kind.is_file() {
        return Err(OpenError::new(shown, Refusal::NotRegular(kind_name(kind))));
    }
    let reopened = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let fd = rustix::fs::open(reopened, read_flags(), Mode::empty()).map_err(|e| io(e.into()))?;
    let file = File::from(fd);
    let size = file.metadata().map_err(io)?.len();
    Ok(OpenedFile {
        file,
        size,
        path: shown.to_owned(),
    })
}

fn kind_name(kind: std::fs::FileType) -> &'static str {
    if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_dir() {
        "a directory"
    } else {
        "a special file"
    }
}

/// Opens `path` as process `pid` sees it, inside `/proc/<pid>/root`: symlinks (absolute ones
/// too) resolve within that root and magic links are refused.
pub fn open_in_root(pid: u32, path: &Path) -> Result<OpenedFile, OpenError> {
    let io = |e: rustix::io::Errno| OpenError::new(path, Refusal::Io(e.into()));
    let root = rustix::fs::open(
        format!("/proc/{pid}/root"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)?;
    let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    // openat2 asks to retry (EAGAIN) when a rename raced the lookup.
    let mut attempt = 0;
    let fd = loop {
        let flags = OFlags::PATH | OFlags::CLOEXEC;
        match rustix::fs::openat2(&root, path, flags, Mode::empty(), resolve) {
            Err(rustix::io::Errno::AGAIN) if attempt < 3 => attempt += 1,
            other => break other.map_err(io)?,
        }
    };
    read_regular(fd, path)
}

/// The files of one process, opened through its own view of them.
#[derive(Debug, Clone, Default)]
pub struct ProcessFiles {
    pid: u32,
    /// Mapped file path → its `/proc/<pid>/map_files/<start>-<end>` entry.
    mapped: HashMap<PathBuf, PathBuf>,
    /// Open file path → its `/proc/<pid>/fd/<n>` entry.
    open: HashMap<PathBuf, PathBuf>,
}

impl ProcessFiles {
    /// Lists the process's mapped and open files (their entries, not their contents).
    pub fn new(pid: u32) -> ProcessFiles {
        ProcessFiles {
            pid,
            mapped: links(&format!("/proc/{pid}/map_files")),
            open: links(&format!("/proc/{pid}/fd")),
        }
    }

    /// Opens the process's file `path`: the mapping or descriptor it holds when it has one
    /// (deleted files included), else the path inside the process's root.
    pub fn open(&self, path: &Path) -> Result<OpenedFile, OpenError> {
        match self.mapped.get(path).or_else(|| self.open.get(path)) {
            Some(entry) => open_as(entry, path),
            None => open_in_root(self.pid, path),
        }
    }
}

/// The targets of the magic links in `dir`, each with the first entry pointing at it (a
/// deleted file's target loses its ` (deleted)` suffix).
fn links(dir: &str) -> HashMap<PathBuf, PathBuf> {
    let mut links = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return links;
    };
    for entry in entries.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = match target.to_str().and_then(|t| t.strip_suffix(" (deleted)")) {
            Some(stripped) => PathBuf::from(stripped),
            None => target,
        };
        if target.is_absolute() {
            links.entry(target).or_insert_with(|| entry.path());
        }
    }
    links
}

#[cfg(test)]
mod tests;

//! A process's virtual memory areas from `/proc/<pid>/maps` (or `smaps`, for resident sizes).

use std::path::{Path, PathBuf};

use procfs::process::MMapPath;

use super::{CollectError, open};

/// What backs a memory area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmaKind {
    /// A file; `deleted` when the file was unlinked after being mapped.
    File { path: PathBuf, deleted: bool },
    /// Anonymous memory from mmap (malloc'd buffers, KV caches…).
    Anonymous,
    /// The brk heap.
    Heap,
    /// A stack.
    Stack,
    /// vdso, vvar, SysV shm and other kernel-provided areas.
    Other(String),
}

/// One virtual memory area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// Offset into the file, for file mappings.
    pub offset: u64,
    /// `rwxp`/`rwxs` as printed by the kernel.
    pub perms: String,
    pub inode: u64,
    pub kind: VmaKind,
    /// Resident bytes (only when read from smaps).
    pub rss: Option<u64>,
}

impl Vma {
    /// Size of the area in bytes.
    pub fn size(&self) -> u64 {
        self.end - self.start
    }

    /// The file path if this is a file mapping.
    pub fn file(&self) -> Option<&Path> {
        match &self.kind {
            VmaKind::File { path, .. } => Some(path),
            _ => None,
        }
    }
}

/// Reads the areas of `pid`; with `resident`, reads smaps to fill [`Vma::rss`] (slower).
pub fn vmas(pid: u32, resident: bool) -> Result<Vec<Vma>, CollectError> {
    let process = open(pid)?;
    let (maps, what) = if resident {
        (process.smaps(), "smaps")
    } else {
        (process.maps(), "maps")
    };
    let maps = maps.map_err(|e| CollectError::from_proc(pid, what, e))?;
    Ok(maps
        .into_iter()
        .map(|map| Vma {
            start: map.address.0,
            end: map.address.1,
            offset: map.offset,
            perms: map.perms.as_str().to_owned(),
            inode: map.inode,
            rss: resident.then(|| map.extension.map.get("Rss").copied().unwrap_or(0)),
            kind: kind_of(map.pathname),
        })
        .collect())
}

fn kind_of(path: MMapPath) -> VmaKind {
    match path {
        MMapPath::Path(path) => {
            let text = path.to_string_lossy();
            match text.strip_suffix(" (deleted)") {
                Some(stripped) => VmaKind::File {
                    path: PathBuf::from(stripped),
                    deleted: true,
                },
                None => VmaKind::File {
                    path,
                    deleted: false,
                },
            }
        }
        MMapPath::Anonymous => VmaKind::Anonymous,
        MMapPath::Heap => VmaKind::Heap,
        MMapPath::Stack | MMapPath::TStack(_) => VmaKind::Stack,
        MMapPath::Vdso => VmaKind::Other("[vdso]".into()),
        MMapPath::Vvar => VmaKind::Other("[vvar]".into()),
        MMapPath::Vsyscall => VmaKind::Other("[vsyscall]".into()),
        MMapPath::Rollup => VmaKind::Other("[rollup]".into()),
        MMapPath::Vsys(key) => VmaKind::Other(format!("SYSV{key:08x}")),
        MMapPath::Other(other) => VmaKind::Other(other),
    }
}

/// All the areas one file is mapped into, summed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedFile {
    pub path: PathBuf,
    pub deleted: bool,
    /// Total size of the areas mapping the file.
    pub size: u64,
    /// Resident bytes across those areas (0 unless read from smaps).
    pub resident: u64,
    /// `(start, end)` of each area, in address order.
    pub ranges: Vec<(u64, u64)>,
}

/// Groups file areas by file and keeps those mapped for at least `min_bytes`, largest first.
pub fn mapped_files(vmas: &[Vma], min_bytes: u64) -> Vec<MappedFile> {
    let mut files: Vec<MappedFile> = Vec::new();
    for vma in vmas {
        let VmaKind::File { path, deleted } = &vma.kind else {
            continue;
        };
        let file = match files.iter_mut().find(|f| &f.path == path) {
            Some(file) => file,
            None => {
                files.push(MappedFile {
                    path: path.clone(),
                    deleted: *deleted,
                    size: 0,
                    resident: 0,
                    ranges: Vec::new(),
                });
                files.last_mut().expect("just pushed")
            }
        };
        file.size += vma.size();
        file.resident += vma.rss.unwrap_or(0);
        file.ranges.push((vma.start, vma.end));
    }
    files.retain(|f| f.size >= min_bytes);
    files.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.path.cmp(&b.path)));
    files
}

#[cfg(test)]
mod tests {
    use std::{fs::File, io::Write as _, os::fd::AsRawFd as _};

    use super::*;

    /// Maps a real 4 MiB file, touches half of it, and reads it back through smaps.
    #[test]
    fn sees_a_file_mapping_and_its_resident_part() {
        let dir = std::env::temp_dir().join(format!("infermem-maps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("weights.bin");
        let mut file = File::create(&path).unwrap();
        file.write_all(&vec![7u8; 4 << 20]).unwrap();
        let file = File::open(&path).unwrap();
        // SAFETY: mapping a file we own read-only; unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 << 20,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let mut sum = 0u64;
        for page in 0..512 {
            // SAFETY: inside the 4 MiB mapping.
            sum += unsafe { *(addr as *const u8).add(page * 4096) } as u64;
        }
        assert_eq!(sum, 7 * 512);

        let vmas = vmas(std::process::id(), true).unwrap();
        let files = mapped_files(&vmas, 1 << 20);
        let mapped = files
            .iter()
            .find(|f| f.path == path)
            .expect("the mapping is listed");
        assert_eq!(mapped.size, 4 << 20);
        assert!(mapped.resident >= 2 << 20, "resident {}", mapped.resident);
        assert_eq!(mapped.ranges, vec![(addr as u64, addr as u64 + (4 << 20))]);

        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(addr, 4 << 20) };
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn groups_areas_of_one_file_and_filters_small_ones() {
        let area = |start: u64, end: u64, path: &str| Vma {
            start,
            end,
            offset: 0,
            perms: "r--p".into(),
            inode: 1,
            kind: VmaKind::File {
                path: path.into(),
                deleted: false,
            },
            rss: Some(end - start),
        };
        let vmas = [
            area(0x1000, 0x2000, "/lib/libc.so"),
            area(0x10_0000, 0x30_0000, "/models/a.gguf"),
            area(0x30_0000, 0x50_0000, "/models/a.gguf"),
            area(0x60_0000, 0x70_0000, "/models/b.gguf"),
        ];
        let files = mapped_files(&vmas, 1 << 20);
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].path, Path::new("/models/a.gguf"));
        assert_eq!(files[0].size, 0x40_0000);
        assert_eq!(files[0].ranges.len(), 2);
        assert_eq!(files[1].path, Path::new("/models/b.gguf"));
    }
}

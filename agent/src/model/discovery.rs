//! Finding the model files a process uses: the files it maps (from /proc and from the probes'
//! mmap events) and the files it holds open, recognised by extension and by magic bytes
//! (Ollama's blobs have no extension).

use std::{
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::open::{self, OpenError, OpenedFile};

/// Model file formats infermem recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    Gguf,
    Safetensors,
    /// PyTorch `torch.save` output (`.bin`, `.pt`, `.pth`): a zip archive or a legacy pickle.
    Pytorch,
    Onnx,
}

/// How a process was found using a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FoundBy {
    /// Listed in /proc/<pid>/maps.
    Mapped,
    /// Open file descriptor in /proc/<pid>/fd.
    OpenFd,
    /// The probes saw it being mapped.
    MmapEvent,
}

/// A model file a process uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFile {
    pub path: PathBuf,
    pub format: ModelFormat,
    pub size_bytes: u64,
    pub found_by: Vec<FoundBy>,
    /// `(index, count)` for shards named `…-00002-of-00005.…`.
    pub shard: Option<(u32, u32)>,
}

/// Files smaller than this are not considered model weights.
pub const MIN_MODEL_BYTES: u64 = 1 << 20;

/// Recognises the model file at `path` (opened safely); `None` for anything else.
pub fn sniff(path: &Path) -> Option<ModelFormat> {
    sniff_file(&open::open_regular(path).ok()?)
}

/// Recognises an open model file by extension and magic bytes; `None` for anything else
/// (shared libraries, fonts, databases…). Reads at most 16 bytes.
pub fn sniff_file(file: &OpenedFile) -> Option<ModelFormat> {
    let path = &file.path;
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if name.contains(".so") || extension == "py" {
        return None;
    }
    let size = file.size;
    let mut head = [0u8; 16];
    let n = file.file.read_at(&mut head, 0).ok()?;
    let head = &head[..n];
    if head.starts_with(b"GGUF") {
        return Some(ModelFormat::Gguf);
    }
    if head.len() >= 9 {
        let header_len = u64::from_le_bytes(head[..8].try_into().ok()?);
        if head[8] == b'{' && header_len >= 2 && header_len.saturating_add(8) <= size {
            return Some(ModelFormat::Safetensors);
        }
    }
    let torch_extension = matches!(extension.as_str(), "bin" | "pt" | "pth" | "ckpt");
    // A zip archive (torch.save since 1.6) or a pickle stream (protocol 2+ starts with 0x80).
    if torch_extension && (head.starts_with(b"PK\x03\x04") || head.first() == Some(&0x80)) {
        return Some(ModelFormat::Pytorch);
    }
    // ONNX is a bare protobuf: no magic; trust the extension.
    if extension == "onnx" {
        return Some(ModelFormat::Onnx);
    }
    None
}

/// A model file found, with the descriptor it was recognised on (to be parsed on the same).
#[derive(Debug)]
pub struct Recognised {
    pub file: ModelFile,
    pub opened: OpenedFile,
}

/// Collects the model files among `candidates` (paths with how each was found), each opened
/// once with `open`, merging duplicates and skipping small, special or unrecognised files.
pub fn recognise(
    candidates: impl IntoIterator<Item = (PathBuf, FoundBy)>,
    open: impl Fn(&Path) -> Result<OpenedFile, OpenError>,
) -> Vec<Recognised> {
    let mut files: Vec<Recognised> = Vec::new();
    for (path, how) in candidates {
        if let Some(existing) = files.iter_mut().find(|f| f.file.path == path) {
            if !existing.file.found_by.contains(&how) {
                existing.file.found_by.push(how);
            }
            continue;
        }
        let Ok(opened) = open(&path) else {
            continue;
        };
        if opened.size < MIN_MODEL_BYTES {
            continue;
        }
        let Some(format) = sniff_file(&opened) else {
            continue;
        };
        let shard = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(super::safetensors::shard_info);
        files.push(Recognised {
            file: ModelFile {
                path,
                format,
                size_bytes: opened.size,
                found_by: vec![how],
                shard,
            },
            opened,
        });
    }
    files.sort_by(|a, b| {
        b.file
            .size_bytes
            .cmp(&a.file.size_bytes)
            .then_with(|| a.file.path.cmp(&b.file.path))
    });
    files
}

/// The targets of `/proc/<pid>/fd/*` that are regular files.
pub fn open_files(pid: u32) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .filter(|target| target.is_absolute())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{fs::File, io::Write as _};

    use super::*;

    fn scratch(name: &str, bytes: &[u8], pad_to: usize) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("infermem-sniff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let mut file = File::create(&path).unwrap();
        file.write_all(bytes).unwrap();
        file.write_all(&vec![0u8; pad_to.saturating_sub(bytes.len())])
            .unwrap();
        path
    }

    #[test]
    fn recognises_formats_by_magic_and_extension() {
        let gguf = scratch("sha256-1234", b"GGUF\x03\0\0\0", 2 << 20);
        assert_eq!(
            sniff(&gguf),
            Some(ModelFormat::Gguf),
            "Ollama blobs have no extension"
        );
        let mut st = 100u64.to_le_bytes().to_vec();
        st.extend_from_slice(b"{\"a\":1}");
        let safetensors = scratch("model-00002-of-00003.safetensors", &st, 2 << 20);
        assert_eq!(sniff(&safetensors), Some(ModelFormat::Safetensors));
        let torch = scratch("pytorch_model.bin", b"PK\x03\x04", 2 << 20);
        assert_eq!(sniff(&torch), Some(ModelFormat::Pytorch));
        let onnx = scratch("model.onnx", b"\x08\x07\x12", 2 << 20);
        assert_eq!(sniff(&onnx), Some(ModelFormat::Onnx));
        let other = scratch("data.bin", b"\x00\x01\x02", 2 << 20);
        assert_eq!(sniff(&other), None);
        let small = scratch("tiny.gguf", b"GGUF", 10);

        let found: Vec<ModelFile> = recognise(
            [
                (gguf.clone(), FoundBy::Mapped),
                (gguf.clone(), FoundBy::OpenFd),
                (safetensors.clone(), FoundBy::OpenFd),
                (other, FoundBy::Mapped),
                (small, FoundBy::Mapped),
            ],
            open::open_regular,
        )
        .into_iter()
        .map(|r| r.file)
        .collect();
        assert_eq!(found.len(), 2);
        let gguf_file = found.iter().find(|f| f.path == gguf).unwrap();
        assert_eq!(gguf_file.found_by, vec![FoundBy::Mapped, FoundBy::OpenFd]);
        let shard = found.iter().find(|f| f.path == safetensors).unwrap();
        assert_eq!(shard.shard, Some((2, 3)));
        std::fs::remove_dir_all(gguf.parent().unwrap()).unwrap();
    }

    #[test]
    fn lists_our_own_open_files() {
        let path = std::env::current_exe().unwrap();
        let _file = File::open(&path).unwrap();
        assert!(open_files(std::process::id()).contains(&path));
    }
}

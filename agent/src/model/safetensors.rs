//! The safetensors header: an 8-byte little-endian length, then a JSON object naming each
//! tensor's dtype, shape and byte range. Read bounded (at most [`MAX_HEADER`] bytes, never
//! the tensor data) and validated by the `safetensors` crate: offsets contiguous, sizes
//! consistent with dtype and shape; then checked against the file's real length.

use std::{
    collections::BTreeMap,
    io::{BufReader, Read, Seek, SeekFrom},
    path::Path,
};

use safetensors::tensor::Metadata;

use super::open::{self, OpenError, OpenedFile};

/// Largest header accepted. The `safetensors` crate allows 100 MB, but parsing a JSON
/// header takes several times its size in memory; real headers are far smaller (~100 bytes
/// a tensor: a 40,000-tensor file has ~4 MiB, a DeepSeek-V3 shard ~60 KiB), so 32 MiB
/// (~300,000 tensors) keeps a hostile header's parse well under 256 MiB.
pub const MAX_HEADER: u64 = 32 << 20;

/// Why a file is not a readable safetensors header.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("the file is {0} bytes, too short for a safetensors header")]
    TooShort(u64),
    #[error(
        "header length {len} is larger than {limit} bytes (the {MAX_HEADER}-byte limit or the file)"
    )]
    HeaderLength { len: u64, limit: u64 },
    #[error("the header is not a valid safetensors header: {0}")]
    Invalid(String),
    #[error("the tensors need {need} bytes of data but the file has {have} (truncated?)")]
    DataLength { need: u64, have: u64 },
}

/// One tensor of the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StTensor {
    pub name: String,
    /// The dtype as safetensors names it, e.g. `BF16`.
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Byte range in the data section.
    pub data_offsets: (u64, u64),
}

impl StTensor {
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().product()
    }

    pub fn n_bytes(&self) -> u64 {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// A safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsHeader {
    /// Tensors in file order.
    pub tensors: Vec<StTensor>,
    /// The free-form `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
    /// Bytes of the JSON header.
    pub header_len: u64,
    pub file_size: u64,
}

/// Reads the header of the safetensors file at `path` (opened safely).
pub fn parse_path(path: &Path) -> Result<SafetensorsHeader, SafetensorsError> {
    parse_file(&open::open_regular(path)?)
}

/// Reads the header of an open safetensors file, from its start.
pub fn parse_file(file: &OpenedFile) -> Result<SafetensorsHeader, SafetensorsError> {
    let mut reader = &file.file;
    reader.seek(SeekFrom::Start(0))?;
    parse(BufReader::new(reader), file.size)
}

/// Reads a safetensors header from memory (the fuzz target's entry point).
pub fn parse_bytes(bytes: &[u8]) -> Result<SafetensorsHeader, SafetensorsError> {
    parse(bytes, bytes.len() as u64)
}

/// Reads a safetensors header from `reader`, a file of `file_size` bytes.
pub fn parse(mut reader: impl Read, file_size: u64) -> Result<SafetensorsHeader, SafetensorsError> {
    if file_size < 8 {
        return Err(SafetensorsError::TooShort(file_size));
    }
    let mut len = [0u8; 8];
    reader.read_exact(&mut len)?;
    let header_len = u64::from_le_bytes(len);
    let limit = MAX_HEADER.min(file_size - 8);
    if header_len > limit {
        return Err(SafetensorsError::HeaderLength {
            len: header_len,
            limit,
        });
    }
    // Grown as bytes arrive, not reserved from the claimed length.
    let mut json = Vec::new();
    reader.take(header_len).read_to_end(&mut json)?;
    if (json.len() as u64) < header_len {
        return Err(SafetensorsError::TooShort(file_size));
    }
    let metadata: Metadata =
        serde_json::from_slice(&json).map_err(|e| SafetensorsError::Invalid(e.to_string()))?;

    let mut tensors: Vec<StTensor> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| StTensor {
            name,
            dtype: format!("{:?}", info.dtype),
            shape: info.shape.iter().map(|&d| d as u64).collect(),
            data_offsets: (info.data_offsets.0 as u64, info.data_offsets.1 as u64),
        })
        .collect();
    tensors.sort_by_key(|t| (t.data_offsets, t.name.clone()));
    let need = tensors.iter().map(|t| t.data_offsets.1).max().unwrap_or(0);
    let have = file_size - 8 - header_len;
    if need > have {
        return Err(SafetensorsError::DataLength { need, have });
    }
    Ok(SafetensorsHeader {
        tensors,
        metadata: metadata
            .metadata()
            .clone()
            .map(|m| m.into_iter().collect())
            .unwrap_or_default(),
        header_len,
        file_size,
    })
}

/// `(index, count)` of a shard named like `model-00002-of-00005.safetensors`.
pub fn shard_info(file_name: &str) -> Option<(u32, u32)> {
    let (before, after) = file_name.rsplit_once("-of-")?;
    let index = before.rsplit('-').next()?;
    let count = after.split('.').next()?;
    let digits = |s: &str| s.len() >= 2 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(index) || !digits(count) {
        return None;
    }
    let (index, count) = (index.parse().ok()?, count.parse().ok()?);
    (index >= 1 && index <= count).then_some((index, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data: usize) -> Vec<u8> {
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out.resize(out.len() + data, 0);
        out
    }

    const HEADER: &str = r#"{"__metadata__":{"format":"pt"},
        "b":{"dtype":"BF16","shape":[2,3],"data_offsets":[16,28]},
        "a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;

    #[test]
    fn reads_tensors_in_file_order() {
        let h = parse_bytes(&file(HEADER, 28)).unwrap();
        let names: Vec<_> = h
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.dtype.as_str(), t.n_bytes()))
            .collect();
        assert_eq!(names, [("a", "F32", 16), ("b", "BF16", 12)]);
        assert_eq!(h.tensors[1].n_elements(), 6);
        assert_eq!(h.metadata.get("format").map(String::as_str), Some("pt"));
    }

    #[test]
    fn bad_headers_are_clear_errors() {
        let truncated = parse_bytes(&file(HEADER, 20)).unwrap_err();
        assert!(
            matches!(
                truncated,
                SafetensorsError::DataLength { need: 28, have: 20 }
            ),
            "{truncated}"
        );
        let inconsistent = r#"{"a":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}}"#;
        assert!(matches!(
            parse_bytes(&file(inconsistent, 16)),
            Err(SafetensorsError::Invalid(_))
        ));
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(matches!(
            parse_bytes(&huge),
            Err(SafetensorsError::HeaderLength { .. })
        ));
        assert!(matches!(
            parse_bytes(b"1234"),
            Err(SafetensorsError::TooShort(4))
        ));
        assert!(matches!(
            parse_bytes(&file("[1,2]", 0)),
            Err(SafetensorsError::Invalid(_))
        ));
        let bytes = file(HEADER, 28);
        for len in 0..bytes.len() {
            assert!(parse_bytes(&bytes[..len]).is_err(), "cut at {len}");
        }
    }

    #[test]
    fn shard_names() {
        assert_eq!(shard_info("model-00002-of-00005.safetensors"), Some((2, 5)));
        assert_eq!(shard_info("pytorch_model-00001-of-00002.bin"), Some((1, 2)));
        assert_eq!(shard_info("model.safetensors"), None);
        assert_eq!(shard_info("model-00009-of-00005.safetensors"), None);
        assert_eq!(shard_info("a-x-of-y"), None);
    }
}

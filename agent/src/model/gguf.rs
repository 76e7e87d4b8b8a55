//! A bounded reader of GGUF headers (v2 and v3): the metadata key-values, every value type
//! including nested arrays, and the tensor infos. Only the header is read, never the tensor
//! data, and model files are untrusted: every count is checked against the bytes left in the
//! header and against fixed limits before anything is read, nothing is reserved for a count
//! (vectors grow as entries are actually read), everything kept is charged to a per-file
//! memory budget independent of the file's length, large arrays are skipped over (seeking past
//! fixed-size elements) and only counted, and malformed input is an error, never a panic.

use std::{
    collections::HashSet,
    io::{BufReader, Read, Seek, SeekFrom},
    path::Path,
};

use super::{
    ggml::GgmlType,
    open::{self, OpenError, OpenedFile},
};

/// Arrays with more elements than this are skipped over, keeping only their type and length
/// (tokenizer vocabularies have 100k+ entries that infermem never needs).
pub const MAX_KEPT_ARRAY: u64 = 1 << 16;
/// Longest string kept (chat templates are the longest metadata strings, ~10 KiB).
pub const MAX_STRING: u64 = 1 << 20;
/// Deepest nesting of arrays accepted.
pub const MAX_DEPTH: u32 = 8;
/// Dimensions of a tensor (GGML_MAX_DIMS).
pub const MAX_DIMS: u32 = 4;
/// Most tensors accepted in one file. The largest real models have tens of thousands:
/// DeepSeek-V3/R1 and Kimi-K2 GGUF files hold ~1,000-2,000 tensors per file (their experts
/// are merged into one tensor per layer), per-expert exports over 40,000, and DeepSeek-V3's
/// safetensors ~91,000 over all its shards; this is 10x beyond any of them.
pub const MAX_TENSORS: u64 = 1 << 20;
/// Most metadata key-values accepted (real files have 30 to a few hundred).
pub const MAX_KEYS: u64 = 1 << 16;
/// Most bytes the header (key-values and tensor infos) may span. The largest real headers
/// carry 256 Ki-token vocabularies (Gemma 3: 262,144 tokens with their scores and types) and
/// merges lists: ~10-20 MiB. Walking 256 MiB of short strings takes well under a second.
pub const MAX_HEADER_BYTES: u64 = 256 << 20;
/// Most memory the parsed header may take (strings, values and tensor infos kept, each
/// charged before it is allocated), whatever the file's length: a real header keeps a few
/// MiB (vocabularies are not kept); 1 Mi tensor infos need ~100 MiB, so for headers past
/// ~600 Ki tensors this budget is the limit that binds.
pub const MAX_PARSED_BYTES: u64 = 64 << 20;

/// Why a file is not a readable GGUF header.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("not a GGUF file (no GGUF magic)")]
    NotGguf,
    #[error("big-endian GGUF files are not supported")]
    BigEndian,
    #[error("GGUF version {0} is not supported (only 2 and 3)")]
    Version(u32),
    #[error("the header is truncated: it ends at byte {0} while reading {1}")]
    Truncated(u64, &'static str),
    #[error(
        "{what} count {count} at byte {at} cannot fit in the {left} bytes left of the header (bounded by the file's length and the {MAX_HEADER_BYTES}-byte header limit)"
    )]
    Count {
        what: &'static str,
        count: u64,
        at: u64,
        left: u64,
    },
    #[error("{count} {what}: more than the {limit} accepted")]
    Limit {
        what: &'static str,
        count: u64,
        limit: u64,
    },
    #[error("the header extends past byte {MAX_HEADER_BYTES}, the most accepted")]
    HeaderTooLong,
    #[error(
        "the header needs more than the {MAX_PARSED_BYTES} bytes of memory accepted (at byte {0})"
    )]
    Budget(u64),
    #[error("unknown metadata value type {0} at byte {1}")]
    ValueType(u32, u64),
    #[error("arrays nested deeper than {MAX_DEPTH} levels at byte {0}")]
    TooDeep(u64),
    #[error("string of {0} bytes at byte {1} is longer than the {MAX_STRING} bytes accepted")]
    LongString(u64, u64),
    #[error("string at byte {0} is not UTF-8")]
    Utf8(u64),
    #[error("metadata key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("general.alignment {0} is not a power of two")]
    Alignment(u64),
    #[error("tensor {name:?}: {why}")]
    Tensor { name: String, why: String },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// An array value. Its elements are kept only up to [`MAX_KEPT_ARRAY`] of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    /// GGUF value type id of the elements.
    pub elem_type: u32,
    pub len: u64,
    /// The elements, or `None` when the array was too long to keep.
    pub values: Option<Vec<Value>>,
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor info of the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, innermost first (as ggml's `ne`).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of the tensor's data (checked not to overflow when the header was read).
    pub fn n_bytes(&self) -> u64 {
        let rows: u64 = self.dims.iter().skip(1).product();
        rows * self.ggml_type.row_bytes(self.dims[0]).unwrap_or(0)
    }
}

/// A GGUF header.
#[derive(Debug, Clone, PartialEq)]
pub struct Gguf {
    pub version: u32,
    /// Key-values in file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Where the tensor data starts in the file.
    pub data_offset: u64,
    pub file_size: u64,
}

impl Gguf {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    pub fn get_array(&self, key: &str) -> Option<&Array> {
        self.get(key)?.as_array()
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// `general.file_type` (llama_ftype).
    pub fn file_type(&self) -> Option<u64> {
        self.get_u64("general.file_type")
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Bytes of all tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(TensorInfo::n_bytes).sum()
    }
}

/// Reads the GGUF header of the file at `path` (opened safely: a regular file or an error).
pub fn parse_path(path: &Path) -> Result<Gguf, GgufError> {
    parse_file(&open::open_regular(path)?)
}

/// Reads the GGUF header of an open file, from its start.
pub fn parse_file(file: &OpenedFile) -> Result<Gguf, GgufError> {
    let mut reader = &file.file;
    reader.seek(SeekFrom::Start(0))?;
    parse(reader, file.size)
}

/// Reads a GGUF header from memory (the fuzz target's entry point).
pub fn parse_bytes(bytes: &[u8]) -> Result<Gguf, GgufError> {
    parse(std::io::Cursor::new(bytes), bytes.len() as u64)
}

/// Reads a GGUF header from `reader`, a file of `file_size` bytes.
pub fn parse(reader: impl Read + Seek, file_size: u64) -> Result<Gguf, GgufError> {
    let mut r = Reader {
        inner: BufReader::with_capacity(1 << 16, reader),
        pos: 0,
        size: file_size,
        spent: 0,
    };
    let magic: [u8; 4] = r.bytes("the magic")?;
    if &magic != b"GGUF" {
        return Err(GgufError::NotGguf);
    }
    let version = r.u32("the version")?;
    if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
        return Err(GgufError::BigEndian);
    }
    if version != 2 && version != 3 {
        return Err(GgufError::Version(version));
    }
    let tensor_count = r.u64("the tensor count")?;
    let kv_count = r.u64("the metadata count")?;
    let metadata = r.metadata(kv_count)?;
    let tensors = r.tensors(tensor_count)?;
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        Some((_, v)) => v.as_u64().unwrap_or(0),
        None => 32,
    };
    if !alignment.is_power_of_two() {
        return Err(GgufError::Alignment(alignment));
    }
    let data_offset = r.pos.next_multiple_of(alignment);
    check_tensors(&tensors, alignment, data_offset, file_size)?;
    Ok(Gguf {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
        file_size,
    })
}

/// Fails unless `count` is at most `limit`.
fn check_limit(what: &'static str, count: u64, limit: u64) -> Result<(), GgufError> {
    if count > limit {
        return Err(GgufError::Limit { what, count, limit });
    }
    Ok(())
}

/// Each tensor's data must be aligned and lie within the file.
fn check_tensors(
    tensors: &[TensorInfo],
    alignment: u64,
    data_offset: u64,
    file_size: u64,
) -> Result<(), GgufError> {
    for t in tensors {
        let bad = |why: String| GgufError::Tensor {
            name: t.name.clone(),
            why,
        };
        if t.offset % alignment != 0 {
            return Err(bad(format!(
                "offset {} is not aligned to {alignment}",
                t.offset
            )));
        }
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|start| start.checked_add(t.n_bytes()));
        if end.is_none_or(|end| end > file_size) {
            return Err(bad(format!(
                "its {} bytes at offset {} extend past the end of the {file_size}-byte file (truncated?)",
                t.n_bytes(),
                t.offset
            )));
        }
    }
    Ok(())
}

/// Bytes of one element of a fixed-size value type; `None` for strings and arrays.
fn fixed_size(value_type: u32) -> Option<u64> {
    match value_type {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// A position-tracking reader that knows how many bytes the header has left, and how much
/// memory what it kept takes.
struct Reader<R> {
    inner: BufReader<R>,
    pos: u64,
    size: u64,
    /// Bytes of memory charged so far.
    spent: u64,
}

impl<R: Read + Seek> Reader<R> {
    /// Where the header must end: the file's end or the header limit, whichever is first.
    fn end(&self) -> u64 {
        self.size.min(MAX_HEADER_BYTES)
    }

    fn left(&self) -> u64 {
        self.end().saturating_sub(self.pos)
    }

    /// Charges `bytes` of memory to the budget before they are allocated.
    fn charge(&mut self, bytes: u64) -> Result<(), GgufError> {
        self.spent = self.spent.saturating_add(bytes);
        if self.spent > MAX_PARSED_BYTES {
            return Err(GgufError::Budget(self.pos));
        }
        Ok(())
    }

    /// Fails when `len` more bytes would run past the end of the header.
    fn check_room(&self, len: u64, what: &'static str) -> Result<(), GgufError> {
        match self.pos.checked_add(len) {
            Some(end) if end <= self.end() => Ok(()),
            _ if self.size > MAX_HEADER_BYTES => Err(GgufError::HeaderTooLong),
            _ => Err(GgufError::Truncated(self.pos, what)),
        }
    }

    /// Moves past `len` bytes without reading them.
    fn skip(&mut self, len: u64, what: &'static str) -> Result<(), GgufError> {
        self.check_room(len, what)?;
        // check_room bounds `len` by the header limit, far below i64::MAX.
        self.inner.seek_relative(len as i64)?;
        self.pos += len;
        Ok(())
    }

    /// The key-values, keys unique.
    fn metadata(&mut self, count: u64) -> Result<Vec<(String, Value)>, GgufError> {
        check_limit("metadata key-values", count, MAX_KEYS)?;
        // A key-value takes at least 8 (key length) + 4 (type) + 1 bytes.
        self.check_count("metadata", count, 13)?;
        let mut metadata = Vec::new();
        let mut keys = HashSet::new();
        for _ in 0..count {
            let key = self.string("a metadata key")?;
            let value_type = self.u32("a value type")?;
            // The entry, and the key's copy in the duplicate check.
            self.charge(size_of::<(String, Value)>() as u64 + key.len() as u64)?;
            let value = self.value(value_type, 0)?;
            if !keys.insert(key.clone()) {
                return Err(GgufError::DuplicateKey(key));
            }
            metadata.push((key, value));
        }
        Ok(metadata)
    }

    fn tensors(&mut self, count: u64) -> Result<Vec<TensorInfo>, GgufError> {
        check_limit("tensors", count, MAX_TENSORS)?;
        // A tensor info takes at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
        self.check_count("tensor", count, 24)?;
        let mut tensors = Vec::new();
        for _ in 0..count {
            tensors.push(self.tensor_info()?);
        }
        Ok(tensors)
    }

    fn bytes<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), GgufError> {
        self.check_room(buf.len() as u64, what)?;
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(GgufError::Truncated(self.pos, what))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// Fails unless `count` items of at least `min_bytes` each fit in what is left.
    fn check_count(&self, what: &'static str, count: u64, min_bytes: u64) -> Result<(), GgufError> {
        if count
            .checked_mul(min_bytes)
            .is_none_or(|need| need > self.left())
        {
            return Err(GgufError::Count {
                what,
                count,
                at: self.pos,
                left: self.left(),
            });
        }
        Ok(())
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > MAX_STRING {
            return Err(GgufError::LongString(len, at));
        }
        self.check_count("string byte", len, 1)?;
        self.charge(len)?;
        let mut buf = vec![0u8; len as usize];
        self.fill(&mut buf, what)?;
        String::from_utf8(buf).map_err(|_| GgufError::Utf8(at))
    }

    fn value(&mut self, value_type: u32, depth: u32) -> Result<Value, GgufError> {
        let what = "a metadata value";
        Ok(match value_type {
            0 => Value::U8(u8::from_le_bytes(self.bytes(what)?)),
            1 => Value::I8(i8::from_le_bytes(self.bytes(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes(what)?)),
            4 => Value::U32(u32::from_le_bytes(self.bytes(what)?)),
            5 => Value::I32(i32::from_le_bytes(self.bytes(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes(what)?)),
            7 => Value::Bool(u8::from_le_bytes(self.bytes(what)?) != 0),
            8 => Value::String(self.string(what)?),
            9 => Value::Array(self.array(depth)?),
            10 => Value::U64(u64::from_le_bytes(self.bytes(what)?)),
            11 => Value::I64(i64::from_le_bytes(self.bytes(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes(what)?)),
            other => return Err(GgufError::ValueType(other, self.pos - 4)),
        })
    }

    fn array(&mut self, depth: u32) -> Result<Array, GgufError> {
        let (elem_type, len) = self.array_header(depth)?;
        if len > MAX_KEPT_ARRAY {
            self.skip_elements(elem_type, len, depth)?;
            return Ok(Array {
                elem_type,
                len,
                values: None,
            });
        }
        let mut values = Vec::new();
        for _ in 0..len {
            self.charge(size_of::<Value>() as u64)?;
            values.push(self.value(elem_type, depth + 1)?);
        }
        Ok(Array {
            elem_type,
            len,
            values: Some(values),
        })
    }

    /// An array's element type and length, checked against the bytes left.
    fn array_header(&mut self, depth: u32) -> Result<(u32, u64), GgufError> {
        if depth >= MAX_DEPTH {
            return Err(GgufError::TooDeep(self.pos));
        }
        let elem_type = self.u32("an array type")?;
        let len = self.u64("an array length")?;
        let min_bytes = match elem_type {
            8 | 9 => 8,
            other => fixed_size(other).ok_or(GgufError::ValueType(other, self.pos - 12))?,
        };
        self.check_count("array element", len, min_bytes)?;
        Ok((elem_type, len))
    }

    /// Moves past `len` elements of `elem_type` without keeping them: one seek for
    /// fixed-size elements, element by element (bounded by the header's length) otherwise.
    fn skip_elements(&mut self, elem_type: u32, len: u64, depth: u32) -> Result<(), GgufError> {
        if let Some(size) = fixed_size(elem_type) {
            // check_count made sure that `len * size` fits in what is left.
            return self.skip(len * size, "an array");
        }
        for _ in 0..len {
            if elem_type == 8 {
                let at = self.pos;
                let n = self.u64("a string length")?;
                if n > MAX_STRING {
                    return Err(GgufError::LongString(n, at));
                }
                self.skip(n, "a string")?;
            } else {
                let (inner_type, inner_len) = self.array_header(depth + 1)?;
                self.skip_elements(inner_type, inner_len, depth + 1)?;
            }
        }
        Ok(())
    }

    fn tensor_info(&mut self) -> Result<TensorInfo, GgufError> {
        let name = self.string("a tensor name")?;
        let n_dims = self.u32("a tensor's dimension count")?;
        let bad = |why: String| GgufError::Tensor {
            name: name.clone(),
            why,
        };
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(bad(format!(
                "{n_dims} dimensions (1 to {MAX_DIMS} expected)"
            )));
        }
        let charge = size_of::<TensorInfo>() + name.len() + 8 * n_dims as usize;
        self.charge(charge as u64)?;
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64("a tensor dimension")?);
        }
        let type_id = self.u32("a tensor type")?;
        let offset = self.u64("a tensor offset")?;
        let ggml_type = GgmlType::from_id(type_id)
            .ok_or_else(|| bad(format!("unknown ggml type {type_id}")))?;
        let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let row = ggml_type.row_bytes(dims[0]);
        let rows = dims
            .iter()
            .skip(1)
            .try_fold(1u64, |acc, &d| acc.checked_mul(d));
        match (elements, row, rows) {
            (Some(_), Some(row), Some(rows)) if row.checked_mul(rows).is_some() => {}
            (_, None, _) if elements.is_some() => {
                return Err(bad(format!(
                    "rows of {} elements are not whole {} blocks of {}",
                    dims[0],
                    ggml_type.name(),
                    ggml_type.block_size()
                )));
            }
            _ => return Err(bad(format!("its shape {dims:?} overflows"))),
        }
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        })
    }
}

#[cfg(test)]
mod tests;

//! A bounded reader of GGUF headers (v2 and v3): the metadata key-values, every value type
//! including nested arrays, and the tensor infos. Only the header is read, never the tensor
//! data, and model files are untrusted: every count is checked against the bytes left in the
//! file before anything is allocated, large arrays are counted but not kept, and malformed
//! input is an error, never a panic.

use std::{
    fs::File,
    io::{BufReader, Read},
    path::Path,
};

use super::ggml::GgmlType;

/// Arrays with more elements than this are skipped over, keeping only their type and length
/// (tokenizer vocabularies have 100k+ entries that infermem never needs).
pub const MAX_KEPT_ARRAY: u64 = 1 << 16;
/// Longest string kept (chat templates are the longest metadata strings, ~10 KiB).
pub const MAX_STRING: u64 = 1 << 20;
/// Deepest nesting of arrays accepted.
pub const MAX_DEPTH: u32 = 8;
/// Dimensions of a tensor (GGML_MAX_DIMS).
pub const MAX_DIMS: u32 = 4;

/// Why a file is not a readable GGUF header.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a GGUF file (no GGUF magic)")]
    NotGguf,
    #[error("big-endian GGUF files are not supported")]
    BigEndian,
    #[error("GGUF version {0} is not supported (only 2 and 3)")]
    Version(u32),
    #[error("the header is truncated: it ends at byte {0} while reading {1}")]
    Truncated(u64, &'static str),
    #[error("{what} count {count} at byte {at} cannot fit in the {left} bytes left in the file")]
    Count {
        what: &'static str,
        count: u64,
        at: u64,
        left: u64,
    },
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

/// Reads the GGUF header of the file at `path`.
pub fn parse_path(path: &Path) -> Result<Gguf, GgufError> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    parse(BufReader::with_capacity(1 << 16, file), size)
}

/// Reads a GGUF header from memory (the fuzz target's entry point).
pub fn parse_bytes(bytes: &[u8]) -> Result<Gguf, GgufError> {
    parse(bytes, bytes.len() as u64)
}

/// Reads a GGUF header from `reader`, a file of `file_size` bytes.
pub fn parse(reader: impl Read, file_size: u64) -> Result<Gguf, GgufError> {
    let mut r = Reader {
        inner: reader,
        pos: 0,
        size: file_size,
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
    // A key-value takes at least 8 (key length) + 4 (type) + 1 bytes.
    r.check_count("metadata", kv_count, 13)?;
    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(kv_count as usize);
    for _ in 0..kv_count {
        let key = r.string("a metadata key")?;
        let value_type = r.u32("a value type")?;
        let value = r.value(value_type, 0)?;
        if metadata.iter().any(|(k, _)| *k == key) {
            return Err(GgufError::DuplicateKey(key));
        }
        metadata.push((key, value));
    }
    // A tensor info takes at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
    r.check_count("tensor", tensor_count, 24)?;
    let mut tensors = Vec::with_capacity(tensor_count as usize);
    for _ in 0..tensor_count {
        tensors.push(r.tensor_info()?);
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        Some((_, v)) => v.as_u64().unwrap_or(0),
        None => 32,
    };
    if !alignment.is_power_of_two() {
        return Err(GgufError::Alignment(alignment));
    }
    let data_offset = r.pos.next_multiple_of(alignment);
    for t in &tensors {
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
    Ok(Gguf {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
        file_size,
    })
}

/// A position-tracking reader that knows how many bytes the file has left.
struct Reader<R> {
    inner: R,
    pos: u64,
    size: u64,
}

impl<R: Read> Reader<R> {
    fn left(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), GgufError> {
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
        if depth >= MAX_DEPTH {
            return Err(GgufError::TooDeep(self.pos));
        }
        let elem_type = self.u32("an array type")?;
        let len = self.u64("an array length")?;
        let min_bytes = match elem_type {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8..=12 => 8,
            other => return Err(GgufError::ValueType(other, self.pos - 12)),
        };
        self.check_count("array element", len, min_bytes)?;
        let keep = len <= MAX_KEPT_ARRAY;
        let mut values = Vec::with_capacity(if keep { len as usize } else { 0 });
        for _ in 0..len {
            let value = self.value(elem_type, depth + 1)?;
            if keep {
                values.push(value);
            }
        }
        Ok(Array {
            elem_type,
            len,
            values: keep.then_some(values),
        })
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

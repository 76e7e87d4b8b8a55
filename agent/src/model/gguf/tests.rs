//! Tests of the GGUF reader on headers written here byte by byte (the end-to-end tests read
//! files written by the `gguf` Python package).

use std::{
    io::{Read, Seek, SeekFrom},
    path::Path,
    time::{Duration, Instant},
};

use super::*;

/// Writes GGUF headers for the tests.
#[derive(Default)]
struct Writer {
    kvs: Vec<u8>,
    kv_count: u64,
    tensors: Vec<u8>,
    tensor_count: u64,
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Writer {
    fn kv(mut self, key: &str, value_type: u32, value: &[u8]) -> Self {
        string(&mut self.kvs, key);
        self.kvs.extend_from_slice(&value_type.to_le_bytes());
        self.kvs.extend_from_slice(value);
        self.kv_count += 1;
        self
    }

    fn kv_str(self, key: &str, value: &str) -> Self {
        let mut v = Vec::new();
        string(&mut v, value);
        self.kv(key, 8, &v)
    }

    fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> Self {
        string(&mut self.tensors, name);
        self.tensors
            .extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            self.tensors.extend_from_slice(&d.to_le_bytes());
        }
        self.tensors.extend_from_slice(&type_id.to_le_bytes());
        self.tensors.extend_from_slice(&offset.to_le_bytes());
        self.tensor_count += 1;
        self
    }

    /// The header, padded to 32 bytes, then `data` bytes of tensor data.
    fn finish(self, version: u32, data: usize) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&self.tensor_count.to_le_bytes());
        out.extend_from_slice(&self.kv_count.to_le_bytes());
        out.extend_from_slice(&self.kvs);
        out.extend_from_slice(&self.tensors);
        out.resize(out.len().next_multiple_of(32) + data, 0);
        out
    }
}

fn array(elem_type: u32, len: u64, elems: &[u8]) -> Vec<u8> {
    let mut v = elem_type.to_le_bytes().to_vec();
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(elems);
    v
}

fn sample() -> Vec<u8> {
    // A nested array: [[1u8, 2u8], [3u8]].
    let mut inner = array(0, 2, &[1, 2]);
    inner.extend_from_slice(&array(0, 1, &[3]));
    let nested = array(9, 2, &inner);
    let mut tokens = Vec::new();
    for t in ["<s>", "a", "b"] {
        string(&mut tokens, t);
    }
    Writer::default()
        .kv_str("general.architecture", "llama")
        .kv("general.file_type", 4, &7u32.to_le_bytes())
        .kv("llama.block_count", 4, &2u32.to_le_bytes())
        .kv("llama.context_length", 10, &4096u64.to_le_bytes())
        .kv("llama.rope.freq_base", 6, &10000f32.to_le_bytes())
        .kv(
            "llama.attention.head_count_kv",
            9,
            &array(5, 2, &[2, 0, 0, 0, 4, 0, 0, 0]),
        )
        .kv("tokenizer.ggml.tokens", 9, &array(8, 3, &tokens))
        .kv("test.nested", 9, &nested)
        .kv("test.flag", 7, &[1])
        .kv("test.i8", 1, &[0xff])
        .kv("test.f64", 12, &1.5f64.to_le_bytes())
        .kv("test.i64", 11, &(-2i64).to_le_bytes())
        .kv("test.u16", 2, &7u16.to_le_bytes())
        .kv("test.i16", 3, &(-7i16).to_le_bytes())
        .tensor("token_embd.weight", &[64, 3], 1, 0)
        .tensor("blk.0.attn_q.weight", &[64, 64], 8, 384)
        .finish(3, 384 + 64 * 2 * 34)
}

#[test]
fn reads_every_value_type_and_tensor_infos() {
    let g = parse_bytes(&sample()).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.architecture(), Some("llama"));
    assert_eq!(g.file_type(), Some(7));
    assert_eq!(g.get_u64("llama.context_length"), Some(4096));
    assert_eq!(g.get("llama.rope.freq_base"), Some(&Value::F32(10000.0)));
    let kv = g.get_array("llama.attention.head_count_kv").unwrap();
    assert_eq!(
        kv.values.as_ref().unwrap(),
        &vec![Value::I32(2), Value::I32(4)]
    );
    let tokens = g.get_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len, 3);
    assert_eq!(tokens.values.as_ref().unwrap()[1].as_str(), Some("a"));
    let nested = g.get_array("test.nested").unwrap().values.as_ref().unwrap();
    assert_eq!(
        nested[1].as_array().unwrap().values,
        Some(vec![Value::U8(3)])
    );
    assert_eq!(g.get("test.flag").and_then(Value::as_bool), Some(true));
    assert_eq!(g.get("test.i8"), Some(&Value::I8(-1)));
    assert_eq!(
        g.get("test.i8").unwrap().as_u64(),
        None,
        "negative is not unsigned"
    );
    assert_eq!(g.get("test.f64"), Some(&Value::F64(1.5)));
    assert_eq!(g.get("test.i64"), Some(&Value::I64(-2)));
    assert_eq!(g.get_u64("test.u16"), Some(7));
    assert_eq!(g.get("test.i16"), Some(&Value::I16(-7)));

    assert_eq!(g.tensors.len(), 2);
    let q = g.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(
        (q.ggml_type.name(), q.n_elements(), q.n_bytes()),
        ("Q8_0", 4096, 64 * 2 * 34)
    );
    assert_eq!(g.tensor("token_embd.weight").unwrap().n_bytes(), 384);
    assert_eq!(g.data_offset % 32, 0);
    assert_eq!(g.data_offset + g.data_bytes(), g.file_size);
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let bytes = sample();
    for len in 0..bytes.len() {
        assert!(
            parse_bytes(&bytes[..len]).is_err(),
            "a file cut at {len} bytes parsed"
        );
    }
}

#[test]
fn every_flipped_byte_in_the_header_is_handled() {
    let bytes = sample();
    let header_len = bytes.len() - (384 + 64 * 2 * 34);
    for i in 0..header_len {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= flip;
            let _ = parse_bytes(&b);
        }
    }
}

#[test]
fn version_two_is_read_and_others_are_refused() {
    let v2 = Writer::default()
        .kv_str("general.architecture", "gpt2")
        .finish(2, 0);
    assert_eq!(parse_bytes(&v2).unwrap().version, 2);
    let v1 = Writer::default().finish(1, 0);
    assert!(matches!(parse_bytes(&v1), Err(GgufError::Version(1))));
    let mut big_endian = Writer::default().finish(3, 0);
    big_endian[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(matches!(
        parse_bytes(&big_endian),
        Err(GgufError::BigEndian)
    ));
    assert!(matches!(
        parse_bytes(b"GGML\x03\0\0\0"),
        Err(GgufError::NotGguf)
    ));
}

#[test]
fn huge_counts_are_refused_before_allocating() {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    let err = parse_bytes(&bytes).unwrap_err();
    assert!(
        matches!(
            err,
            GgufError::Limit {
                what: "metadata key-values",
                ..
            }
        ),
        "{err}"
    );

    let long_array = Writer::default()
        .kv("a", 9, &array(12, 1 << 40, &[]))
        .finish(3, 0);
    assert!(matches!(
        parse_bytes(&long_array),
        Err(GgufError::Count { .. })
    ));
    let long_string = Writer::default()
        .kv("a", 8, &(1u64 << 40).to_le_bytes())
        .finish(3, 0);
    assert!(matches!(
        parse_bytes(&long_string),
        Err(GgufError::LongString(..))
    ));
}

#[test]
fn deep_nesting_and_bad_types_are_refused() {
    let mut value = array(0, 0, &[]);
    for _ in 0..MAX_DEPTH {
        value = array(9, 1, &value);
    }
    let deep = Writer::default().kv("deep", 9, &value).finish(3, 0);
    assert!(matches!(parse_bytes(&deep), Err(GgufError::TooDeep(_))));
    let bad_type = Writer::default().kv("x", 13, &[0; 8]).finish(3, 0);
    assert!(matches!(
        parse_bytes(&bad_type),
        Err(GgufError::ValueType(13, _))
    ));
    let duplicate = Writer::default()
        .kv_str("k", "a")
        .kv_str("k", "b")
        .finish(3, 0);
    assert!(matches!(
        parse_bytes(&duplicate),
        Err(GgufError::DuplicateKey(_))
    ));
}

#[test]
fn long_arrays_are_counted_not_kept() {
    let len = MAX_KEPT_ARRAY + 1;
    let g = parse_bytes(
        &Writer::default()
            .kv("big", 9, &array(0, len, &vec![7u8; len as usize]))
            .finish(3, 0),
    )
    .unwrap();
    let big = g.get_array("big").unwrap();
    assert_eq!((big.len, big.values.is_none()), (len, true));
}

#[test]
fn tensors_are_checked_against_the_file() {
    let cases: [(Writer, &str); 5] = [
        (Writer::default().tensor("t", &[64], 1, 0), "past the end"),
        (
            Writer::default().tensor("t", &[33], 8, 0),
            "whole Q8_0 blocks",
        ),
        (Writer::default().tensor("t", &[], 0, 0), "dimensions"),
        (
            Writer::default().tensor("t", &[1 << 40, 1 << 40], 0, 0),
            "overflows",
        ),
        (
            Writer::default().tensor("t", &[4], 1000, 0),
            "unknown ggml type",
        ),
    ];
    for (writer, why) in cases {
        let err = parse_bytes(&writer.finish(3, 16)).unwrap_err().to_string();
        assert!(err.contains(why), "{err} (expected {why})");
    }
    let misaligned = Writer::default().tensor("t", &[4], 0, 8).finish(3, 64);
    assert!(
        parse_bytes(&misaligned)
            .unwrap_err()
            .to_string()
            .contains("not aligned")
    );
    let alignment = Writer::default()
        .kv("general.alignment", 4, &24u32.to_le_bytes())
        .finish(3, 0);
    assert!(matches!(
        parse_bytes(&alignment),
        Err(GgufError::Alignment(24))
    ));
}

#[test]
fn reads_a_file_written_by_gguf_py() {
    // agent/fuzz/seeds/make_seeds.py wrote it with the `gguf` package (the fuzzers' seed).
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/gguf/tiny-llama.gguf");
    let g = parse_path(&path).unwrap();
    assert_eq!((g.version, g.architecture()), (3, Some("llama")));
    assert_eq!(g.get_u64("llama.block_count"), Some(2));
    assert_eq!(g.get_u64("llama.attention.head_count_kv"), Some(2));
    let strings = g
        .get_array("test.strings")
        .unwrap()
        .values
        .as_ref()
        .unwrap();
    assert_eq!(strings[1].as_str(), Some("bc"));
    assert_eq!(g.get("test.f64"), Some(&Value::F64(0.5)));
    let embd = g.tensor("token_embd.weight").unwrap();
    // gguf-py writes numpy's shape reversed: (8, 32) becomes ne = [32, 8].
    assert_eq!(
        (embd.dims.as_slice(), embd.ggml_type.name(), embd.n_bytes()),
        (&[32, 8][..], "F16", 512)
    );
    assert_eq!(
        g.tensor("blk.0.attn_q.weight").unwrap().n_bytes(),
        32 * 32 * 4
    );
}

/// A sparse file in memory: `head`, then zeros up to `size` bytes (as `ftruncate` leaves).
struct Sparse {
    head: Vec<u8>,
    size: u64,
    pos: u64,
}

impl Sparse {
    fn new(head: Vec<u8>, size: u64) -> Self {
        Sparse { head, size, pos: 0 }
    }

    fn parse(self) -> (Result<Gguf, GgufError>, Duration) {
        let started = Instant::now();
        let size = self.size;
        (parse(self, size), started.elapsed())
    }
}

impl Read for Sparse {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.size.saturating_sub(self.pos)) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = self.head.get(self.pos as usize + i).copied().unwrap_or(0);
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Sparse {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::Current(d) => self.pos.checked_add_signed(d).unwrap(),
            SeekFrom::End(d) => self.size.checked_add_signed(d).unwrap(),
        };
        Ok(self.pos)
    }
}

/// A header of `tensors` and `kvs` counts, followed by `rest`.
fn claims(tensors: u64, kvs: u64, rest: &[u8]) -> Vec<u8> {
    let mut head = b"GGUF".to_vec();
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&tensors.to_le_bytes());
    head.extend_from_slice(&kvs.to_le_bytes());
    head.extend_from_slice(rest);
    head
}

const SPARSE_12_GIB: u64 = 12 << 30;

#[test]
fn huge_counts_in_a_sparse_file_hit_the_limits_at_once() {
    for (tensors, kvs, what) in [
        (0, 600_000_000, "metadata key-values"),
        (300_000_000, 0, "tensors"),
    ] {
        let (result, took) = Sparse::new(claims(tensors, kvs, &[]), SPARSE_12_GIB).parse();
        let err = result.unwrap_err();
        assert!(
            matches!(err, GgufError::Limit { what: w, .. } if w == what),
            "{err}"
        );
        assert!(took < Duration::from_millis(100), "{took:?}");
    }
    // Within the limits, the zeros of a sparse file are read as they are: the second empty key
    // is a duplicate.
    let (result, _) = Sparse::new(claims(MAX_TENSORS, MAX_KEYS, &[]), SPARSE_12_GIB).parse();
    assert!(
        matches!(result, Err(GgufError::DuplicateKey(_))),
        "{result:?}"
    );
}

#[test]
fn a_two_to_the_33_element_array_is_refused_at_once() {
    let kv = Writer::default().kv("a", 9, &array(0, 1 << 33, &[]));
    let head = claims(0, 1, &kv.kvs);
    let (result, took) = Sparse::new(head, SPARSE_12_GIB).parse();
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            GgufError::Count {
                what: "array element",
                ..
            }
        ),
        "{err}"
    );
    assert!(took < Duration::from_millis(100), "{took:?}");
}

#[test]
fn long_fixed_size_arrays_are_skipped_by_seeking() {
    // 200 MiB of u8 elements, within the header's span: skipped in one seek, not read.
    let len = 200 << 20;
    let kv = Writer::default().kv("big", 9, &array(0, len, &[]));
    let head = claims(0, 1, &kv.kvs);
    let (result, took) = Sparse::new(head, SPARSE_12_GIB).parse();
    let g = result.unwrap();
    assert_eq!(
        g.get_array("big").map(|a| (a.len, a.values.is_none())),
        Some((len, true))
    );
    assert!(took < Duration::from_millis(100), "{took:?}");
}

#[test]
fn a_header_longer_than_the_limit_is_refused() {
    // Strings are walked one by one: 40 Mi empty strings span 320 MiB, past the limit.
    let kv = Writer::default().kv("tokens", 9, &array(8, 40 << 20, &[]));
    let head = claims(0, 1, &kv.kvs);
    let (result, took) = Sparse::new(head, SPARSE_12_GIB).parse();
    assert!(matches!(result, Err(GgufError::Count { .. })), "{result:?}");
    assert!(took < Duration::from_millis(100), "{took:?}");
    // 4 Mi empty strings (32 MiB, a large vocabulary's worth) are walked, not kept.
    let kv = Writer::default().kv("tokens", 9, &array(8, 4 << 20, &[]));
    let (result, took) = Sparse::new(claims(0, 1, &kv.kvs), SPARSE_12_GIB).parse();
    assert_eq!(result.unwrap().get_array("tokens").unwrap().len, 4 << 20);
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn what_is_kept_is_charged_to_the_memory_budget() {
    // Arrays short enough to keep, 64 Ki u64 each: ~2.5 MiB of values for 512 KiB of file.
    let elems = vec![0u8; (MAX_KEPT_ARRAY * 8) as usize];
    let mut w = Writer::default();
    for i in 0..40 {
        w = w.kv(&format!("a{i}"), 9, &array(10, MAX_KEPT_ARRAY, &elems));
    }
    let err = parse_bytes(&w.finish(3, 0)).unwrap_err();
    assert!(matches!(err, GgufError::Budget(_)), "{err}");
}

#[test]
fn many_distinct_keys_are_checked_for_duplicates_quickly() {
    let mut w = Writer::default();
    for i in 0..MAX_KEYS {
        w = w.kv(&format!("k{i}"), 4, &[0; 4]);
    }
    let started = Instant::now();
    assert_eq!(
        parse_bytes(&w.finish(3, 0)).unwrap().metadata.len(),
        MAX_KEYS as usize
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

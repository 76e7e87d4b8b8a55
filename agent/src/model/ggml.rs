//! ggml's tensor element types and llama.cpp's file types: ids as GGUF stores them, and how
//! many bytes a row of each type takes (ggml.h and ggml.c `type_traits`).

/// A ggml tensor element type, as GGUF tensor infos and llama.cpp cache types name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType {
    id: u32,
    name: &'static str,
    /// Elements per block (1 for plain types).
    block_size: u32,
    /// Bytes per block.
    type_size: u32,
}

/// `(id, name, elements per block, bytes per block)` of every type ggml defines today; ids
/// ggml removed (4, 5, 31–33, 36–38) are absent.
const TYPES: &[(u32, &str, u32, u32)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

impl GgmlType {
    pub const F32: GgmlType = GgmlType::known(0);
    pub const F16: GgmlType = GgmlType::known(1);

    const fn known(id: u32) -> GgmlType {
        let mut i = 0;
        while i < TYPES.len() {
            let (tid, name, block_size, type_size) = TYPES[i];
            if tid == id {
                return GgmlType {
                    id,
                    name,
                    block_size,
                    type_size,
                };
            }
            i += 1;
        }
        panic!("not a ggml type id")
    }

    /// The type with GGUF id `id`, if ggml defines it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES
            .iter()
            .find(|t| t.0 == id)
            .map(|&(id, name, block_size, type_size)| GgmlType {
                id,
                name,
                block_size,
                type_size,
            })
    }

    /// The type named `name` (case-insensitive: `q8_0`, `F16`…), as llama.cpp's
    /// `--cache-type-k` takes it.
    pub fn from_name(name: &str) -> Option<GgmlType> {
        TYPES
            .iter()
            .find(|t| t.1.eq_ignore_ascii_case(name))
            .and_then(|t| GgmlType::from_id(t.0))
    }

    pub fn id(self) -> u32 {
        self.id
    }

    /// The upper-case name ggml prints, e.g. `Q4_K`.
    pub fn name(self) -> &'static str {
        self.name
    }

    pub fn block_size(self) -> u32 {
        self.block_size
    }

    pub fn type_size(self) -> u32 {
        self.type_size
    }

    /// Bytes of a row of `elements` (ggml_row_size); `None` when `elements` is not a whole
    /// number of blocks or the size overflows.
    pub fn row_bytes(self, elements: u64) -> Option<u64> {
        let block = u64::from(self.block_size);
        if !elements.is_multiple_of(block) {
            return None;
        }
        (elements / block).checked_mul(u64::from(self.type_size))
    }
}

/// The name of llama.cpp's `general.file_type` (enum llama_ftype), e.g. 15 → `Q4_K_M`.
pub fn file_type_name(file_type: u64) -> Option<&'static str> {
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_sizes_match_ggml() {
        let q8 = GgmlType::from_name("q8_0").unwrap();
        assert_eq!(q8.id(), 8);
        assert_eq!(q8.row_bytes(128), Some(4 * 34));
        assert_eq!(q8.row_bytes(100), None, "not a whole number of blocks");
        assert_eq!(GgmlType::F16.row_bytes(64 * 2), Some(256));
        let q4k = GgmlType::from_id(12).unwrap();
        assert_eq!((q4k.name(), q4k.row_bytes(4096)), ("Q4_K", Some(16 * 144)));
        assert_eq!(GgmlType::from_id(4), None, "removed Q4_2");
        assert_eq!(GgmlType::from_id(1000), None);
        assert_eq!(file_type_name(15), Some("Q4_K_M"));
        assert_eq!(file_type_name(4), None);
    }

    #[test]
    fn every_id_is_unique() {
        for (i, a) in TYPES.iter().enumerate() {
            assert!(
                TYPES[i + 1..].iter().all(|b| b.0 != a.0 && b.1 != a.1),
                "{a:?}"
            );
        }
    }
}

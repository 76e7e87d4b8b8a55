//! Any bytes given to the safetensors header reader: an error or a header, never a panic.
#![no_main]

use infermem::model::safetensors;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = safetensors::parse_bytes(data);
});

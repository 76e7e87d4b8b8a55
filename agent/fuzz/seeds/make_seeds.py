#!/usr/bin/env python3
"""Writes the fuzzers' seed files (small, valid headers) with the `gguf` package.

Run with the tests' venv: target/llama-venv/bin/python agent/fuzz/seeds/make_seeds.py
"""
import json
import pathlib
import struct

import gguf
import numpy as np

HERE = pathlib.Path(__file__).parent


def gguf_seed():
    path = HERE / "gguf" / "tiny-llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_uint8("test.u8", 1)
    w.add_int16("test.i16", -2)
    w.add_float64("test.f64", 0.5)
    w.add_bool("test.bool", True)
    w.add_array("test.strings", ["a", "bc"])
    w.add_array("test.ints", [1, 2, 3])
    w.add_tensor("token_embd.weight", np.ones((8, 32), dtype=np.float16))
    w.add_tensor("blk.0.attn_q.weight", np.ones((32, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def safetensors_seed():
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [8, 16]},
    }
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + bytes(16)
    (HERE / "safetensors" / "two-tensors.safetensors").write_bytes(data)


gguf_seed()
safetensors_seed()

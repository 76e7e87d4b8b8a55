#!/usr/bin/env python3
"""Writes a tiny random-weight llama-architecture GGUF model with PyPI's `gguf` package.

Used by infermem's end-to-end tests to check its predictions against a real llama.cpp.
Deterministic (fixed seed). Shapes:
  gqa: 16 layers, n_embd 512, 8 heads, 2 KV heads (grouped-query attention)
  mha: 8 layers, n_embd 512, 8 heads, 8 KV heads (multi-head attention)
  narrow: 6 layers, n_embd 256, 4 heads, 4 KV heads, a 768-wide feed-forward
Weights are f32, f16, q8_0 or q4_0 (q4_0 is what llama.cpp's CPU backend repacks on AVX2).
"""
import argparse

import gguf
import numpy as np

SHAPES = {
    "gqa": dict(layers=16, embd=512, heads=8, kv_heads=2, ff=512),
    "mha": dict(layers=8, embd=512, heads=8, kv_heads=8, ff=512),
    "narrow": dict(layers=6, embd=256, heads=4, kv_heads=4, ff=768),
}


def vocabulary():
    """A SentencePiece-style vocabulary: specials, the 256 byte tokens, a few words."""
    tokens, scores, types = [], [], []

    def add(text, score, kind):
        tokens.append(text)
        scores.append(score)
        types.append(kind)

    add("<unk>", 0.0, gguf.TokenType.UNKNOWN)
    add("<s>", 0.0, gguf.TokenType.CONTROL)
    add("</s>", 0.0, gguf.TokenType.CONTROL)
    for byte in range(256):
        add(f"<0x{byte:02X}>", 0.0, gguf.TokenType.BYTE)
    for i, word in enumerate(["\u2581the", "\u2581a", "\u2581model", "\u2581memory", "\u2581hello"]):
        add(word, -float(i + 1), gguf.TokenType.NORMAL)
    return tokens, scores, types


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gqa")
    parser.add_argument("--weight-type", choices=["f32", "f16", "q8_0", "q4_0"], default="f16")
    parser.add_argument("--ctx-train", type=int, default=8192)
    args = parser.parse_args()
    s = SHAPES[args.shape]
    rng = np.random.default_rng(1234)
    head_dim = s["embd"] // s["heads"]
    kv_dim = head_dim * s["kv_heads"]

    w = gguf.GGUFWriter(args.out, "llama")
    w.add_name(f"infermem-test-{args.shape}")
    w.add_context_length(args.ctx_train)
    w.add_embedding_length(s["embd"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ff"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[args.weight_type]
    w.add_file_type(file_type)
    tokens, scores, types = vocabulary()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    n_vocab = len(tokens)

    def tensor(name, *shape, norm=False):
        # numpy shape is (rows, cols); ggml's ne[0] is the last numpy dimension.
        data = np.ones(shape, dtype=np.float32) if norm else (rng.standard_normal(shape) * 0.02).astype(np.float32)
        if norm or args.weight_type == "f32" or len(shape) == 1:
            w.add_tensor(name, data)
        elif args.weight_type == "f16":
            w.add_tensor(name, data.astype(np.float16))
        else:
            qtype = {
                "q8_0": gguf.GGMLQuantizationType.Q8_0,
                "q4_0": gguf.GGMLQuantizationType.Q4_0,
            }[args.weight_type]
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    tensor("token_embd.weight", n_vocab, s["embd"])
    for i in range(s["layers"]):
        tensor(f"blk.{i}.attn_norm.weight", s["embd"], norm=True)
        tensor(f"blk.{i}.attn_q.weight", s["embd"], s["embd"])
        tensor(f"blk.{i}.attn_k.weight", kv_dim, s["embd"])
        tensor(f"blk.{i}.attn_v.weight", kv_dim, s["embd"])
        tensor(f"blk.{i}.attn_output.weight", s["embd"], s["embd"])
        tensor(f"blk.{i}.ffn_norm.weight", s["embd"], norm=True)
        tensor(f"blk.{i}.ffn_gate.weight", s["ff"], s["embd"])
        tensor(f"blk.{i}.ffn_up.weight", s["ff"], s["embd"])
        tensor(f"blk.{i}.ffn_down.weight", s["embd"], s["ff"])
    tensor("output_norm.weight", s["embd"], norm=True)
    tensor("output.weight", n_vocab, s["embd"])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()

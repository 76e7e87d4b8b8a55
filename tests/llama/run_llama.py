#!/usr/bin/env python3
"""Loads a GGUF model in a real llama.cpp (through llama-cpp-python) and holds it.

Prints one JSON object per line on stdout:
  {"event": "waiting", "pid": ...}          with --wait-before-load, then reads a line
  {"event": "ready", "pid": ..., "n_ctx": ..., "model_size": ..., "n_params": ...}
and then holds the model until stdin closes. llama.cpp's own log (KV cache and buffer
sizes) goes to stderr, where the test reads it.
"""
import argparse
import json
import os
import sys

# ggml type ids (ggml.h) of the cache types the tests use.
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}


def say(**event):
    print(json.dumps(event), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--n-ctx", type=int, required=True)
    parser.add_argument("--type-k", default="f16", choices=sorted(GGML_TYPES))
    parser.add_argument("--type-v", default="f16", choices=sorted(GGML_TYPES))
    parser.add_argument("--flash-attn", action="store_true")
    parser.add_argument("--wait-before-load", action="store_true")
    args = parser.parse_args()

    if args.wait_before_load:
        say(event="waiting", pid=os.getpid())
        if not sys.stdin.readline():
            return

    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=args.n_ctx,
        n_gpu_layers=0,
        use_mmap=True,
        type_k=GGML_TYPES[args.type_k],
        type_v=GGML_TYPES[args.type_v],
        flash_attn=args.flash_attn,
        seed=1,
        verbose=True,
    )
    # Write a few cells of the KV cache.
    llm.eval(llm.tokenize(b"hello the model memory", add_bos=True))
    say(
        event="ready",
        pid=os.getpid(),
        n_ctx=llm.n_ctx(),
        model_size=llama_cpp.llama_model_size(llm.model),
        n_params=llama_cpp.llama_model_n_params(llm.model),
        llama_cpp_python=llama_cpp.__version__,
    )
    sys.stdin.read()


if __name__ == "__main__":
    main()

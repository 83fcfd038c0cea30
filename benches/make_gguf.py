#!/usr/bin/env python3
"""Makes the GGUF of a synthetic benchmark checkpoint, for `bench --peer
llama.cpp` (the same weights in llama.cpp's format):

    python benches/make_gguf.py CHECKPOINT_DIR LLAMA_CPP_DIR [--outtype bf16|f32|f16|q8_0]

CHECKPOINT_DIR is a Mixtral-layout checkpoint written by
`cargo run --release --example synthetic_checkpoint -- DIR 4 8 1024 3584 BF16 32000 16 8`
(the scaled Mixtral model of the benchmarks). LLAMA_CPP_DIR is a llama.cpp
source tree (the llama-cpp-python source package carries one under
`vendor/llama.cpp`); its own `convert_hf_to_gguf.py` and `gguf-py` do the
conversion, so nothing is converted by this project's code.

Synthetic checkpoints have no tokenizer, and the converter needs one: a
small SentencePiece model is trained on generated text and written as
`tokenizer.model` next to the weights (the converter pads the vocabulary to
the config's `vocab_size` with `[PAD…]` tokens). Token ids are what the
benchmarks feed, so the tokenizer's pieces do not matter.

Needs: torch, numpy, safetensors, sentencepiece, transformers (for the
converter's imports).
"""
import argparse
import os
import random
import subprocess
import sys
import tempfile


def train_tokenizer(dst):
    import sentencepiece as spm

    rng = random.Random(7)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "text.txt")
        with open(text, "w") as f:
            for _ in range(4000):
                f.write(" ".join(rng.choice(words) for _ in range(12)) + "\n")
        prefix = os.path.join(tmp, "tok")
        spm.SentencePieceTrainer.train(
            input=text, model_prefix=prefix, vocab_size=1000, model_type="bpe", minloglevel=2,
        )
        os.replace(prefix + ".model", os.path.join(dst, "tokenizer.model"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("llama_cpp")
    ap.add_argument("--outtype", default="bf16")
    ap.add_argument("--outfile")
    a = ap.parse_args()
    if not os.path.exists(os.path.join(a.checkpoint, "tokenizer.model")):
        train_tokenizer(a.checkpoint)
    out = a.outfile or os.path.join(a.checkpoint, f"model-{a.outtype}.gguf")
    env = dict(os.environ, PYTHONPATH=os.path.join(a.llama_cpp, "gguf-py"))
    cmd = [sys.executable, os.path.join(a.llama_cpp, "convert_hf_to_gguf.py"), a.checkpoint,
           "--outtype", a.outtype, "--outfile", out]
    subprocess.run(cmd, check=True, env=env)
    print(out)


if __name__ == "__main__":
    main()

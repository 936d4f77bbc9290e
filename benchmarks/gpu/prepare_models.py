"""Write the random-weight models the GPU benchmarks serve: Llama 3.2 1B's layers quantized to
4 bits, and with ``--with-8b`` Llama 3.1 8B's layers in bfloat16 (this tokenizer's small
vocabulary in both; random weights, so the answers are noise and the speed is the real one).

    python benchmarks/gpu/prepare_models.py --out DIR [--with-8b]

Writes DIR/llama-1b-4bit (and DIR/llama-8b-bf16); a model already there is kept.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from genmlx.demo.random_model import LLAMA_1B_SHAPE, LLAMA_8B_SHAPE, write_demo_model


def quantized(source: Path, target: Path, bits: int) -> Path:
    from mlx_lm import convert

    if not target.exists():
        convert(hf_path=str(source), mlx_path=str(target), quantize=True, q_bits=bits)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the directory the models go in")
    parser.add_argument("--with-8b", action="store_true", help="also Llama 3.1 8B's layers in bfloat16")
    options = parser.parse_args()
    started = time.monotonic()
    plain = write_demo_model(options.out / "work" / "llama-1b-bf16", shape=LLAMA_1B_SHAPE)
    print(f"{quantized(plain, options.out / 'llama-1b-4bit', 4)} ({time.monotonic() - started:.0f} s)")
    shutil.rmtree(options.out / "work")
    if options.with_8b:
        path = write_demo_model(options.out / "llama-8b-bf16", shape=LLAMA_8B_SHAPE)
        print(f"{path} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()

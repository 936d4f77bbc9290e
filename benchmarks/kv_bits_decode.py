"""Decode speed with a quantized KV cache (``serving.kvBits: 8``) over the model's own float16 cache,
at a long context, in the same run.

    python benchmarks/kv_bits_decode.py [--model DIR | --shape demo|benchmark] [--context 1024]
        [--tokens 64] [--rounds 3]

Two real dispatcher processes serve the same model (a random-weight one of ``--shape``,
``benchmark`` by default: heads of 64 values, which 8-bit groups of 64 can quantize): one with
``--kv-bits 8``, one without. Each round sends each server the same prompt of ``--context`` token
ids and times the decode of ``--tokens`` tokens at temperature 0 as ``decode_throughput.py`` does
(from the first text chunk to the last, so the prefill is left out; rate = (tokens - 1) / seconds).
The medians are compared: quantized over float16. A quantized cache is read in fewer bytes each
step but dequantized on the way; on Apple silicon, where decode is bound by memory bandwidth, the
first wins at long contexts; on this CPU backend the second may.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from decode_throughput import add_model_options, model_directory, our_dispatcher, time_ours
from prefix_cache_ttft import build_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.set_defaults(shape="benchmark")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens before the decode")
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded and timed")
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    rates: dict[str, list[float]] = {"float16": [], "kvBits 8": []}
    with model_directory(options.model, options.shape) as model_dir, tempfile.TemporaryDirectory() as work:
        prompt = build_prompts(model_dir, options.context, 1).prefix(0)
        room = ["--context-length", str(options.context + options.tokens + 64)]
        with (
            our_dispatcher(model_dir, Path(work), room) as plain,
            our_dispatcher(model_dir, Path(work), [*room, "--kv-bits", "8"]) as quantized,
        ):
            for n in range(options.rounds):
                for name, server in (("float16", plain), ("kvBits 8", quantized)):
                    run = time_ours(server, options.tokens, prompt)
                    if run.tokens != options.tokens:
                        raise SystemExit(f"{name}: {run.tokens} tokens generated, {options.tokens} asked")
                    rates[name].append(run.tokens_per_second)
                latest = ", ".join(f"{name} {rate[-1]:.1f} tok/s" for name, rate in rates.items())
                print(f"round {n}: {latest}")
    plain_rate, quantized_rate = (statistics.median(r) for r in rates.values())
    print(
        f"model {model_dir.name}, {options.context}-token context, {options.tokens} tokens decoded (medians)"
    )
    print(f"  float16 {plain_rate:.1f} tok/s; kvBits 8 {quantized_rate:.1f} tok/s")
    print(f"  kvBits 8 / float16: {quantized_rate / plain_rate:.2f}")


if __name__ == "__main__":
    main()

"""The cost of constrained decoding per generated token: JSON-schema requests over free ones, on the
same dispatcher, in the same run.

    python benchmarks/constrained_decoding.py [--model DIR | --shape demo|benchmark] [--tokens 512]
        [--levels 1 16] [--rounds 5]

One dispatcher (``python -m genmlx.dispatcher``) on the demo model (or ``--model``/``--shape``). At
each level, that many threads each send one chat completion at once, all free or all constrained
by a JSON schema, with the same prompts, ``max_tokens`` and temperature 0. The schema is an array
of at least 500 enum items, so no constrained request can end before ``max_tokens`` and both kinds
generate exactly the same number of tokens; the timed difference is the grammar's work (a matcher
per request, one llguidance call for the masks of a step's constrained rows, applied in MLX) and
nothing else. Replies are not streamed: parsing sixteen event streams in the client would take
most of a small machine's CPU away from the server, for both kinds alike, and hide the server's
difference in the client's noise.

Timed: from just before the first request is sent to the end of the last reply (each thread builds
its ``openai`` client before the clock starts). Runs alternate free / constrained ``--rounds`` times
per level, so background load reaches both alike. Printed per level: each kind's median seconds per
generated token over the whole batch, and constrained over free as the median of the rounds' own
ratios, with their range (the aim: at most 1.1 at 16 streams).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from decode_throughput import Server, add_model_options, model_directory, our_dispatcher, paired_ratios

PROMPTS = (
    "List animals you like.",
    "Name some pets.",
    "Which animals live in houses?",
    "Tell me about cats and dogs.",
)
SCHEMA = {"type": "array", "items": {"enum": ["cat", "dog", "bird"]}, "minItems": 500}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "pets", "schema": SCHEMA}}


def run_level(server: Server, streams: int, tokens: int, constrained: bool) -> float:
    """Seconds per generated token of ``streams`` concurrent requests started together."""
    counts = [0] * streams
    start = threading.Barrier(streams + 1)
    extra = {"response_format": RESPONSE_FORMAT} if constrained else {}

    def one_stream(index: int) -> None:
        client = server.client()
        start.wait()
        reply = client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
            max_tokens=tokens,
            temperature=0,
            **extra,
        )
        counts[index] = reply.usage.completion_tokens

    threads = [threading.Thread(target=one_stream, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    if sum(counts) != streams * tokens:
        raise RuntimeError(f"expected {streams * tokens} tokens, got {sum(counts)}: the comparison is off")
    return seconds / sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--tokens", type=int, default=512, help="max_tokens of every request")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16], help="concurrent streams")
    parser.add_argument("--rounds", type=int, default=5, help="runs per level and kind")
    options = parser.parse_args()
    with (
        model_directory(options.model, options.shape) as model_dir,
        tempfile.TemporaryDirectory() as work,
        our_dispatcher(model_dir, Path(work), ["--max-batch", "32"]) as server,
    ):
        run_level(server, 2, 8, constrained=True)  # warm-up: loads the grammar engine's tokenizer
        run_level(server, 2, 8, constrained=False)
        print(f"model: {model_dir}; max_tokens {options.tokens}; temperature 0")
        print(f"{'streams':>7} {'free ms/token':>14} {'constrained':>12}  constrained/free (paired rounds)")
        for level in options.levels:
            free, constrained = [], []
            for _ in range(options.rounds):
                free.append(run_level(server, level, options.tokens, constrained=False))
                constrained.append(run_level(server, level, options.tokens, constrained=True))
            ratio = paired_ratios(constrained, free)
            free_ms, constrained_ms = statistics.median(free) * 1e3, statistics.median(constrained) * 1e3
            print(f"{level:>7} {free_ms:>14.2f} {constrained_ms:>12.2f}  {ratio}")


if __name__ == "__main__":
    main()

"""Time to first token after a restart: a long prompt answered from the prompt cache's disk tier,
over the same prompt cold, in the same run.

    python benchmarks/disk_cache_ttft.py [--model DIR | --shape demo|benchmark] [--prompt-tokens 8000]
        [--rounds 3]

A real dispatcher process (``python -m genmlx.dispatcher`` with ``--disk-cache-dir`` and
``--disk-cache-gb``, and ``--context-length`` set to hold the prompt) serves the model (a
random-weight one of ``--shape``, ``benchmark`` by default, unless ``--model`` names one). Each
round:

- cold: a prompt of ``--prompt-tokens`` token ids the cache has never seen (its first token differs
  from every earlier prompt's), so nothing is reused and the whole prompt is computed;
- the dispatcher is stopped (it writes out the blocks still queued) and started again, so memory
  holds nothing;
- disk: the same prompt again, which the disk tier answers (its whole 256-token blocks and the
  snapshot stored where it ended: every token but the last, which is always computed).

Timed as in ``prefix_cache_ttft.py``: from the moment the request leaves the HTTP client to the
first chunk that carries text, streaming, at temperature 0; each request's ``cached_tokens`` is
checked (0 cold, every whole block of the prompt from disk), or the benchmark stops, since it would
time something else. The medians of the rounds are compared: disk/cold (the aim: at most 0.05).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from decode_throughput import add_model_options, model_directory, our_dispatcher
from prefix_cache_ttft import SendClock, Timed, build_prompts, time_to_first_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.set_defaults(shape="benchmark")
    parser.add_argument("--prompt-tokens", type=int, default=8000, help="tokens of each prompt")
    parser.add_argument("--rounds", type=int, default=3, help="cold-then-disk pairs")
    options = parser.parse_args()
    cold: list[Timed] = []
    disk: list[Timed] = []
    with model_directory(options.model, options.shape) as model_dir, tempfile.TemporaryDirectory() as work:
        prompts = build_prompts(model_dir, options.prompt_tokens, options.rounds)
        flags = [
            "--disk-cache-dir",
            str(Path(work) / "kv-cache"),
            "--disk-cache-gb",
            "20",
            "--context-length",
            str(options.prompt_tokens + 64),
        ]
        for n in range(options.rounds):
            prompt = prompts.prefix(n)
            cold.append(timed(model_dir, Path(work), flags, prompt))
            disk.append(timed(model_dir, Path(work), flags, prompt))
            expected = len(prompt) - 1  # whole blocks and the snapshot where the prompt ended
            if (cold[-1].cached_tokens, disk[-1].cached_tokens) != (0, expected):
                sys.exit(
                    f"round {n}: cached tokens {cold[-1].cached_tokens} cold and {disk[-1].cached_tokens} "
                    f"from disk; expected 0 and {expected}: this would time something else"
                )
            print(f"round {n}: cold {cold[-1].ttft:.2f}s, from disk after a restart {disk[-1].ttft:.3f}s")
    cold_s = statistics.median(t.ttft for t in cold)
    disk_s = statistics.median(t.ttft for t in disk)
    print(f"model {model_dir.name}, {options.prompt_tokens}-token prompt, {options.rounds} rounds (medians)")
    print(f"  cold TTFT {cold_s:.2f}s; from disk after a restart {disk_s:.3f}s")
    print(f"  disk/cold {disk_s / cold_s:.3f}  (aim: at most 0.05); speed-up {cold_s / disk_s:.0f}x")


def timed(model_dir: Path, work: Path, flags: list[str], prompt: list[int]) -> Timed:
    """One request to a freshly started dispatcher, which is stopped after it."""
    with our_dispatcher(model_dir, work, flags) as server:
        clock = SendClock()
        return time_to_first_token(clock, clock.client(server), server.model, prompt, max_tokens=2)


if __name__ == "__main__":
    main()

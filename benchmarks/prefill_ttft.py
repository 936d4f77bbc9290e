"""Time to first token of a long prompt, cold and warm: our dispatcher against ``mlx_lm.server``.

    python benchmarks/prefill_ttft.py [--model DIR | --shape demo|benchmark] [--prompt-tokens 4000]
        [--rounds 5] [--max-tokens 2] [--json PATH]

Three servers run as processes on 127.0.0.1 on the same model (the demo model, written to a temporary
directory, unless ``--model`` names one or ``--shape`` asks for a larger random one; the prompt and
``max_tokens`` must fit the model's context, which is 2,048 for the demo model):

- ours: ``python -m genmlx.dispatcher`` with its defaults: a prompt is read 2,048 tokens a step on a
  GPU while no other sequence decodes (``--prefill-chunk-alone``; 512 on MLX's CPU backend), 512
  while one does (``--prefill-chunk``); a 16-entry prefix cache;
- ours, 512-token steps: the same started with ``--prefill-chunk-alone 512``, how it read every
  prompt before; printed for reference (on the CPU backend the same as ours);
- ``python -m mlx_lm.server`` given nothing but the model and its address, so its own defaults hold
  (2,048-token prefill steps, 32 sequences decoding, 8 prompts read together, a 10-entry prompt
  cache).

Prompts are text, for every server: ``mlx_lm.server``'s ``/v1/completions`` hands ``prompt`` to the
tokenizer's ``encode``, which takes text only (a list of token ids is an error there). Each prompt is
a start word, then the demo corpus repeated, as few words as make at least ``--prompt-tokens`` tokens
in the model's own tokenizer (BOS included; both servers put the tokenizer's BOS in front). The start
word is chosen so that the prompt's first token after the BOS differs from that of every earlier
prompt, so a server can reuse nothing of it but the BOS. Every round has a new prompt, the same for
every server (each server caches only what it was sent itself).

Each round, each server in turn gets, one after the other, two streaming ``/v1/completions``
requests through the ``openai`` client, at temperature 0 with ``--max-tokens`` (2):

- cold: the round's prompt, which that server has never seen;
- warm: the same prompt again, once the cold request has completed: a prefix cache hit on all three.

Timed (TTFT): from the moment the request is sent, read in the HTTP client's request hook after the
SDK has built the request, to the arrival of the first chunk that carries text. Both servers turn
tokens into text with mlx-lm's streaming detokenizers, which may hold a token's text back until the
next token, so on either a TTFT may include one decode step; with a long prompt that step is small
beside reading the prompt. Every request's ``usage`` (``stream_options include_usage``) is checked:
``prompt_tokens`` must be the count computed here; a cold request's
``prompt_tokens_details.cached_tokens`` at most the BOS (both servers' caches, mlx-lm's
``LRUPromptCache`` bookkeeping, hand out the one token every prompt shares); a warm request's at
least all but the prompt's last token. Anything else stops the benchmark, since it would then time
something other than it says.

All three servers run throughout (an idle one costs next to no CPU) and each first answers one
untimed cold-and-warm pair. Printed: each server's median cold and warm TTFT (and the most cached
tokens a cold request reported, the fewest a warm one did), then the ratios
ours / ``mlx_lm.server`` and ours with 512-token steps / ours, cold and warm, each as the median of
the rounds' own ratios (the two servers' requests of the same round) with their range. ``--json``
writes the same figures to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import openai
from concurrent_streams import mlx_lm_server
from decode_throughput import (
    Server,
    add_dequantize_option,
    add_model_options,
    dequantize_flags,
    model_directory,
    our_dispatcher,
    paired_ratios,
)
from prefix_cache_ttft import SendClock, Timed, context_length, time_to_first_token

OURS = "ours"
OURS_512 = "ours, 512-token steps"
MLX_LM = "mlx_lm.server"
# (numerator, denominator) of each printed ratio.
RATIOS = ((OURS, MLX_LM), (OURS_512, OURS))


@dataclass(frozen=True)
class Prompts:
    """Text prompts, one per round, with their lengths in tokens (BOS included); ``leading``: the
    tokens the tokenizer puts in front of every text (its BOS), which all prompts share."""

    texts: list[str]
    tokens: list[int]
    leading: int


def build_prompts(model_dir: Path, prompt_tokens: int, count: int) -> Prompts:
    """``count`` prompts of at least ``prompt_tokens`` tokens whose first tokens after the BOS all
    differ: a start word from the demo corpus, then the corpus repeated."""
    import transformers
    from mlx_lm.utils import load_tokenizer

    from genmlx.demo.random_model import CORPUS

    transformers.logging.set_verbosity_error()  # not its warning that a prompt outgrows the model
    tokenizer = load_tokenizer(model_dir)
    leading = len(tokenizer.encode("x")) - len(tokenizer.encode("x", add_special_tokens=False))
    words = CORPUS.split()
    body = words * (prompt_tokens // len(words) + 2)  # every word is at least one token

    def encoded(start: str, n: int) -> list[int]:
        return tokenizer.encode(" ".join([start, *body[:n]]))

    texts: list[str] = []
    lengths: list[int] = []
    firsts: set[int] = set()
    for start in dict.fromkeys(words):
        if len(texts) == count:
            break
        low, high = 0, len(body)  # the fewest body words that reach prompt_tokens: in (low, high]
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if len(encoded(start, middle)) >= prompt_tokens else (middle, high)
        tokens = encoded(start, high)
        if len(tokens) < prompt_tokens or tokens[leading] in firsts:
            continue
        firsts.add(tokens[leading])
        texts.append(" ".join([start, *body[:high]]))
        lengths.append(len(tokens))
    if len(texts) < count:
        raise SystemExit(f"only {len(texts)} prompts with distinct first tokens here; use fewer rounds")
    return Prompts(texts, lengths, leading)


@dataclass
class Side:
    """One server's timed rounds."""

    name: str
    server: Server
    cold: list[Timed] = field(default_factory=list)
    warm: list[Timed] = field(default_factory=list)
    clock: SendClock = field(default_factory=SendClock)
    # One client for all rounds, built here: building an openai.OpenAI() takes some 30 ms, which
    # must not be timed, and a real client keeps its connection open between requests.
    client: openai.OpenAI = field(init=False)

    def __post_init__(self) -> None:
        self.client = self.clock.client(self.server)

    def run_round(self, prompts: Prompts, n: int, max_tokens: int) -> None:
        """Prompt ``n`` cold, then the same again warm; both checked, then kept."""
        text, length = prompts.texts[n], prompts.tokens[n]
        cold = time_to_first_token(self.clock, self.client, self.server.model, text, max_tokens, length)
        warm = time_to_first_token(self.clock, self.client, self.server.model, text, max_tokens, length)
        if cold.cached_tokens > prompts.leading:
            raise SystemExit(
                f"{self.name}: a cold request reported {cold.cached_tokens} cached tokens; "
                f"only the {prompts.leading} every prompt starts with may be reused"
            )
        if warm.cached_tokens < length - 1:
            raise SystemExit(
                f"{self.name}: a warm request reported {warm.cached_tokens} cached tokens "
                f"of its {length}; the whole prompt was cached but its last token"
            )
        self.cold.append(cold)
        self.warm.append(warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--prompt-tokens", type=int, default=4000, help="tokens of every prompt, at least")
    parser.add_argument("--rounds", type=int, default=5, help="timed cold-and-warm pairs per server")
    parser.add_argument("--max-tokens", type=int, default=2, help="max_tokens of every request")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here as JSON")
    add_dequantize_option(parser)
    options = parser.parse_args()
    with (
        model_directory(options.model, options.shape) as model_dir,
        tempfile.TemporaryDirectory() as work,
        ExitStack() as running,
    ):
        prompts = build_prompts(model_dir, options.prompt_tokens, options.rounds + 1)
        check_fits(max(prompts.tokens) + options.max_tokens, context_length(model_dir))
        servers = {
            OURS: running.enter_context(
                our_dispatcher(model_dir, Path(work), dequantize_flags(options, model_dir))
            ),
            OURS_512: running.enter_context(
                our_dispatcher(
                    model_dir,
                    Path(work),
                    ["--prefill-chunk-alone", "512", *dequantize_flags(options, model_dir)],
                )
            ),
            MLX_LM: running.enter_context(mlx_lm_server(model_dir, Path(work), None)),
        }
        sides = [Side(name, server) for name, server in servers.items()]
        run_rounds(sides, prompts, options.rounds, options.max_tokens)
    figures = summary(model_dir, prompts, options.max_tokens, {side.name: side for side in sides})
    report(figures, {side.name: side for side in sides})
    if options.json:
        options.json.write_text(json.dumps(figures, indent=2) + "\n")


def check_fits(longest: int, context: int | None) -> None:
    if context is not None and longest > context:
        raise SystemExit(f"prompt and max_tokens reach {longest} tokens; the model's context is {context}")


def run_rounds(sides: list[Side], prompts: Prompts, rounds: int, max_tokens: int) -> None:
    """One untimed pair per server (prompt 0), then ``rounds`` rounds, each on every server in turn."""
    for side in sides:
        side.run_round(prompts, 0, max_tokens)
        side.cold.clear()
        side.warm.clear()
    for n in range(1, rounds + 1):
        for side in sides:
            side.run_round(prompts, n, max_tokens)


def ttfts(runs: list[Timed]) -> list[float]:
    return [t.ttft for t in runs]


def ratio_figures(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    ratios = sorted(n / d for n, d in zip(numerator, denominator, strict=True))
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}


def summary(model_dir: Path, prompts: Prompts, max_tokens: int, sides: dict[str, Side]) -> dict:
    """The figures printed and written with ``--json``: seconds, tokens and ratios."""
    timed = prompts.tokens[1:]  # prompt 0 went to the untimed pair
    return {
        "model": str(model_dir),
        "prompt_tokens": {"min": min(timed), "max": max(timed)},
        "max_tokens": max_tokens,
        "rounds": len(timed),
        "servers": {
            name: {
                "cold_ttft_s": statistics.median(ttfts(side.cold)),
                "warm_ttft_s": statistics.median(ttfts(side.warm)),
                "cold_cached_tokens_max": max(t.cached_tokens for t in side.cold),
                "warm_cached_tokens_min": min(t.cached_tokens for t in side.warm),
            }
            for name, side in sides.items()
        },
        "ratios": {
            f"{top} / {bottom}": {
                kind: ratio_figures(ttfts(getattr(sides[top], kind)), ttfts(getattr(sides[bottom], kind)))
                for kind in ("cold", "warm")
            }
            for top, bottom in RATIOS
        },
    }


def report(figures: dict, sides: dict[str, Side]) -> None:
    tokens = figures["prompt_tokens"]
    print(f"model: {figures['model']}")
    length = f"{tokens['min']}" if tokens["min"] == tokens["max"] else f"{tokens['min']}-{tokens['max']}"
    print(
        f"prompt: {length} tokens of text (BOS included); "
        f"max_tokens {figures['max_tokens']}; {figures['rounds']} rounds"
    )
    print("median time to first token from sending the request")
    print(f"{'':24} {'cold ms':>9} {'warm ms':>9} {'cached cold/warm':>17}")
    for name, side in figures["servers"].items():
        cached = f"{side['cold_cached_tokens_max']}/{side['warm_cached_tokens_min']}"
        print(f"{name:24} {side['cold_ttft_s'] * 1e3:>9.1f} {side['warm_ttft_s'] * 1e3:>9.1f} {cached:>17}")
    print("ratios of time to first token, the median of the rounds' own (range):")
    for top, bottom in RATIOS:
        for kind in ("cold", "warm"):
            pair = ttfts(getattr(sides[top], kind)), ttfts(getattr(sides[bottom], kind))
            print(f"  {top} / {bottom}, {kind}: {paired_ratios(*pair)}")


if __name__ == "__main__":
    main()

"""Where a decode step's time goes, in process, at each batch size: the engine's step against the
forward pass it is built around.

    python benchmarks/decode_step_profile.py [--model DIR | --shape demo|benchmark] [--batches 1 8 32 64]
        [--steps 64] [--plain-mlps] [--separate-projections] [--plain-step]

For each batch size B, B sequences with the same 32-token prompt are decoded greedily, and each of
these is timed over ``--steps`` decode steps once all B sequences generate (milliseconds per step):

- ``engine``: our ``BatchDecoder.step`` (mlx-lm's ``BatchGenerator`` with our batch sampler), which
  builds step n+1's graph and hands it to the device before it waits for step n's tokens; a batch
  of one is a sequence decoded alone, through one compiled step over fixed KV buffers as the
  dispatcher decodes it (``genmlx.dispatcher.engine.fixed_decode``; ``--plain-step``: the model's
  call, built in Python every step, as before);
- ``floor``: the same pipelining around the bare model on a plain KV cache (one ``model`` call and
  an argmax per step, nothing else): what a step costs with no bookkeeping at all;
- ``build``: the Python time of one ``model`` call alone (the graph is built, not computed);
- ``device``: one step's forward pass computed with nothing overlapping it (``mx.eval`` after the
  ``model`` call, minus ``build``): the device's time for the step, launches included;
- ``ops``: how many operations one step's graph holds (each is at least one kernel launch); the
  kinds of operation at the first batch size are printed after the table.

The model's quantized layers multiply a batch's rows as one matrix, as the dispatcher makes them
(``genmlx.dispatcher.engine.quantized_batches``); with ``--rows-apart`` they stay as mlx-lm loads
them, one product per sequence. With ``--dequantize-rows N`` they also multiply N rows or more
through their dequantized weight, as the dispatcher's ``--dequantize-rows`` makes them; with
``--dequantize-rows measure``, at the row counts where this device was measured faster so, as the
dispatcher does by default on a CUDA GPU (the measurement is printed). Then 16 different prompts
are decoded greedily for ``--steps`` tokens, each alone and all in one batch, and the sequences
that came out the same both ways are counted.

With ``--spare-gb G`` they may keep copies of their weights dequantized once, within G GB, as the
dispatcher's ``--spare-gb`` lets them (a cluster gives a rank what its batch leaves of the node's
memory): with ``--dequantize-rows N`` they then multiply N rows or more through the copies, with
``measure`` where the copies were measured faster (the figure they take is printed).

Each block's MLP runs its decode steps as a compiled graph, as the dispatcher makes it
(``genmlx.dispatcher.engine.compiled_decode``); with ``--plain-mlps`` it builds its graph in Python
every step, as before. The ``build`` column then shows the difference. Each block's query, key
and value projections multiply as one layer, and its gate and up projections as another, as the
dispatcher stacks them (``genmlx.dispatcher.engine.fused_projections``); with
``--separate-projections`` each stays a product of its own, as before.

If ``engine`` is near ``device``, the device is the limit; near ``build`` plus the bookkeeping, the
host is. ``floor / engine`` is how much of the step's time the engine adds. B x 1000 / ``engine`` is
the tokens/s a batch of B can reach before any serving cost.
"""

from __future__ import annotations

import argparse
import collections
import logging
import re
import statistics
import sys
import tempfile
import time

import mlx.core as mx
from decode_throughput import add_model_options, model_directory
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from genmlx.dispatcher.engine import decoding
from genmlx.dispatcher.engine.compiled_decode import compile_decode_mlps
from genmlx.dispatcher.engine.decoding import BatchDecoder, DecoderSettings
from genmlx.dispatcher.engine.events import GenerationRequest, Sampling
from genmlx.dispatcher.engine.fused_projections import fuse_projections
from genmlx.dispatcher.engine.quantized_batches import dequantize_where_it_pays

PROMPT_TOKENS = 32


WARM_UP_STEPS = 8


def engine_ms(model, batch: int, prompt: list[int], steps: int) -> float:
    settings = DecoderSettings(max_batch=batch, cache_entries=0)
    decoder = BatchDecoder(model, set(), settings)
    for uid in range(batch):
        request = GenerationRequest(f"r{uid}", tuple(prompt), steps * 4, Sampling(temperature=0))
        decoder.join(uid, request)
    generating: set[int] = set()
    while len(generating) < batch:
        generating.update(s.uid for s in decoder.step())
    for _ in range(WARM_UP_STEPS):
        decoder.step()
    started = time.perf_counter()
    for _ in range(steps):
        decoder.step()
    return (time.perf_counter() - started) * 1000 / steps


def prefilled(model, batch: int, prompt: list[int]):
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt] * batch), cache=cache)
    tokens = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(tokens, [c.state for c in cache])
    return cache, tokens


def floor_ms(model, batch: int, prompt: list[int], steps: int) -> float:
    cache, tokens = prefilled(model, batch, prompt)

    def step(previous: mx.array) -> mx.array:
        following = mx.argmax(model(previous[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.async_eval(following)
        return following

    pending = step(tokens)
    for _ in range(WARM_UP_STEPS):
        pending, done = step(pending), pending
        done.tolist()
    started = time.perf_counter()
    for _ in range(steps):
        pending, done = step(pending), pending
        done.tolist()
    elapsed = time.perf_counter() - started
    pending.tolist()
    return elapsed * 1000 / steps


def build_and_device_ms(
    model, batch: int, prompt: list[int], steps: int
) -> tuple[float, float, collections.Counter[str]]:
    cache, tokens = prefilled(model, batch, prompt)
    builds, totals = [], []
    for step in range(WARM_UP_STEPS + steps):
        started = time.perf_counter()
        logits = model(tokens[:, None], cache=cache)
        built = time.perf_counter()
        tokens = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(tokens)
        if step >= WARM_UP_STEPS:
            builds.append(built - started)
            totals.append(time.perf_counter() - started)
    build, total = statistics.median(builds) * 1000, statistics.median(totals) * 1000
    return build, total - build, graph_ops(model, cache, tokens)


def graph_ops(model, cache, tokens: mx.array) -> collections.Counter[str]:
    """The operations in one decode step's graph by kind, counted in MLX's own DOT rendering of it."""
    with tempfile.NamedTemporaryFile("w+", suffix=".dot") as dot:
        mx.export_to_dot(dot, mx.argmax(model(tokens[:, None], cache=cache)[:, -1, :], axis=-1))
        dot.seek(0)
        # Operation nodes are drawn as rectangles labelled with the primitive, arrays as ovals.
        labels = re.findall(r'label\s*=\s*"([^"]*)"[^\]]*shape\s*=\s*rectangle', dot.read())
        return collections.Counter(label.split()[0] if label.split() else "?" for label in labels)


def same_alone_and_together(model, tokenizer, steps: int) -> tuple[int, int]:
    """Of 16 different prompts decoded greedily, how many give the same tokens alone (one row per
    step) as in one batch of 16; and 16."""
    prompts = [tokenizer.encode(f"Prompt number {i}: tell me about the number {i * 7}.") for i in range(16)]

    def decode(uids: list[int]) -> dict[int, list[int]]:
        decoder = BatchDecoder(model, set(), DecoderSettings(max_batch=16, cache_entries=0))
        for uid in uids:
            decoder.join(
                uid, GenerationRequest(f"r{uid}", tuple(prompts[uid]), steps, Sampling(temperature=0))
            )
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        while decoder.active:
            for sampled in decoder.step():
                tokens[sampled.uid].append(sampled.token)
        return tokens

    together = decode(list(range(16)))
    return sum(decode([uid])[uid] == together[uid] for uid in range(16)), 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64], help="batch sizes")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per figure")
    parser.add_argument(
        "--dequantize-rows",
        default="0",
        help="quantized layers dequantize from this many rows (0: never), or where measured faster (measure)",
    )
    parser.add_argument(
        "--rows-apart",
        action="store_true",
        help="leave the quantized layers as mlx-lm loads them: a batch's rows multiplied one by one",
    )
    parser.add_argument(
        "--plain-mlps",
        action="store_true",
        help="leave each block's MLP to build its graph in Python every step, as before it was compiled",
    )
    parser.add_argument(
        "--plain-step",
        action="store_true",
        help="decode a lone sequence through the model's call built every step, not the compiled step",
    )
    parser.add_argument(
        "--separate-projections",
        action="store_true",
        help="leave a block's query, key and value (and gate and up) projections a product each, as before",
    )
    parser.add_argument(
        "--spare-gb",
        type=float,
        help="memory the quantized layers may fill with copies of their weights dequantized once (none)",
    )
    options = parser.parse_args()
    with model_directory(options.model, options.shape) as model_dir:
        model, tokenizer = load(str(model_dir))
        # As the dispatcher does it, saying what it measured and chose.
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        given = options.dequantize_rows
        rows = None if given == "measure" else int(given)
        spare = None if options.spare_gb is None else int(options.spare_gb * 2**30)
        if options.plain_step:
            decoding.fixed_decode_for = lambda model: None  # decoders made from here on
        if not options.separate_projections:
            fuse_projections(model)  # as the dispatcher does, before the quantized layers
        if not options.rows_apart:
            dequantize_where_it_pays(model, rows, spare=spare)
        if not options.plain_mlps:
            compile_decode_mlps(model)  # as the dispatcher does, after the quantized layers
        prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)[:PROMPT_TOKENS]
        print(f"model: {model_dir}; device {mx.default_device()}; {options.steps} steps per figure")
        columns = ("batch", "engine", "floor", "build", "device", "ops")
        print(" ".join(f"{c:>8}" for c in columns), " floor/engine  tok/s")
        kinds = None
        for batch in options.batches:
            engine = engine_ms(model, batch, prompt, options.steps)
            floor = floor_ms(model, batch, prompt, options.steps)
            build, device, ops = build_and_device_ms(model, batch, prompt, options.steps)
            kinds = kinds or (batch, ops)
            print(
                f"{batch:>8} {engine:>8.2f} {floor:>8.2f} {build:>8.2f} {device:>8.2f} {ops.total():>8}"
                f"  {floor / engine:>12.2f}  {batch * 1000 / engine:>5.0f}",
                flush=True,
            )
        if kinds:
            batch, ops = kinds
            listed = ", ".join(f"{kind} {count}" for kind, count in ops.most_common())
            print(f"operations in one step at batch {batch}: {listed}")
        same, of = same_alone_and_together(model, tokenizer, options.steps)
        print(f"greedy tokens the same alone and in a batch of {of}: {same} of {of} sequences")


if __name__ == "__main__":
    sys.exit(main())

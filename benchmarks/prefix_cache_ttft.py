"""Time to first token with a cached 2,000-token prefix, over the same request cold.

    python benchmarks/prefix_cache_ttft.py [--model DIR | --shape demo|benchmark] [--prefix-tokens 2000]
        [--rounds 8]

A real dispatcher process (``python -m genmlx.dispatcher``, default flags: a 16-entry prefix cache,
512-token prefill chunks) serves the model (the demo model, written to a temporary directory,
unless ``--model`` names one or ``--shape benchmark`` asks for a larger random one). Every request
is a streaming ``/v1/completions`` request through the ``openai`` client whose prompt is token ids:
a prefix of exactly ``--prefix-tokens`` tokens (long text, tokenized with the model's own tokenizer) followed
by a short question. Token ids rather than text so that the prefix is exactly that long and, with
no BOS in front, a new prefix shares not even its first token with any earlier prompt.

Each round sends, one after the other:

- cold: a prefix the server has never seen (its first token differs from every earlier prompt's),
  so nothing can be reused and the whole prompt is computed;
- warm: the same prefix as that cold request, which has completed by then, with another question.

Timed (TTFT): from the moment the request is sent to the arrival of the first chunk that carries
text, at temperature 0. "Sent" is read in the HTTP client's request hook, after the ``openai`` SDK
has built the request: building one with 2,000 token ids takes the SDK some 30 ms (it walks the
list), a cost of the client, not of the server; the TTFT from the ``create`` call, SDK included, is
printed beside it. Each request's ``usage.prompt_tokens_details.cached_tokens`` (``stream_options
include_usage``) is checked: 0 for every cold request, at least the prefix length for every warm
one; anything else stops the benchmark, since it would then time something other than it says.
The medians of the rounds are compared: warm/cold, and cold/warm as the speed-up.

As a control, a second dispatcher started with ``--prefix-cache-entries 0`` gets the same requests
(``--no-control`` leaves it out): there warm is as slow as cold and both report 0 cached tokens.
The two servers run throughout (an idle one costs no CPU) and each round goes to both, so a change
in the machine's background load reaches both alike. Each server first answers one untimed
cold-and-warm pair.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import openai
from decode_throughput import Server, add_model_options, model_directory, our_dispatcher

QUESTIONS = (
    " Summarise the text above in one line.",
    " Who climbed up to the old observatory?",
    " What does a river carry to the sea?",
    " Name three things a good cook knows.",
    " Where were the rare maps kept?",
    " Why do engineers write tests?",
    " List the days of the week.",
    " How did the sailor measure each bay?",
)


@dataclass(frozen=True)
class Timed:
    """One request: seconds to its first text chunk from when it was sent (``ttft``) and from the
    SDK call (``from_call``), and the prompt tokens it says were cached."""

    ttft: float
    from_call: float
    cached_tokens: int


class SendClock:
    """When the last request left the client: the HTTP client calls ``on_request`` once the SDK has
    built a request, just before writing it."""

    def __init__(self) -> None:
        self.sent = 0.0

    def on_request(self, request: object) -> None:
        self.sent = time.perf_counter()

    def client(self, server: Server) -> openai.OpenAI:
        http_client = openai.DefaultHttpxClient(event_hooks={"request": [self.on_request]})
        base_url = server.base_url + "/v1"
        return openai.OpenAI(
            base_url=base_url, api_key=server.api_key, max_retries=0, http_client=http_client
        )


@dataclass(frozen=True)
class Prompts:
    """Token-id prompts: a fresh prefix per round (``prefix(n)``) and the questions to end them."""

    body: list[int]
    first_tokens: list[int]
    questions: list[list[int]]

    def prefix(self, n: int) -> list[int]:
        """The ``n``-th never-seen prefix: a first token no other prefix starts with, then the body."""
        return [self.first_tokens[n], *self.body]

    def prompt(self, n: int, question: int) -> list[int]:
        return self.prefix(n) + self.questions[question % len(self.questions)]


def build_prompts(model_dir: Path, prefix_tokens: int, prefixes: int) -> Prompts:
    """``prefixes`` distinct prefixes of ``prefix_tokens`` tokens each, from the demo corpus repeated."""
    from mlx_lm.utils import load_tokenizer

    from genmlx.demo.random_model import CORPUS

    tokenizer = load_tokenizer(model_dir)
    body: list[int] = []
    while len(body) < prefix_tokens - 1:
        body += tokenizer.encode(CORPUS, add_special_tokens=False)
    special = set(tokenizer.all_special_ids)
    # Distinct ordinary tokens, in order of first appearance: one per prefix as its first token.
    first_tokens = [t for t in dict.fromkeys(body) if t not in special][:prefixes]
    if len(first_tokens) < prefixes:
        raise SystemExit(f"the tokenizer has only {len(first_tokens)} distinct tokens here; use fewer rounds")
    questions = [tokenizer.encode(q, add_special_tokens=False) for q in QUESTIONS]
    return Prompts(body[: prefix_tokens - 1], first_tokens, questions)


def time_to_first_token(
    clock: SendClock,
    client: openai.OpenAI,
    model: str,
    prompt: list[int] | str,
    max_tokens: int,
    prompt_tokens: int | None = None,
) -> Timed:
    """Stream one completion of ``prompt`` to its end; when its first text arrived, what was cached.
    Stops the benchmark unless the server counts ``prompt_tokens`` prompt tokens (a token-id
    prompt's length where not given)."""
    expected = len(prompt) if prompt_tokens is None else prompt_tokens
    called = time.perf_counter()
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    first = None
    usage = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    if first is None or usage is None:
        raise SystemExit(f"{client.base_url}: a reply without text or without usage; nothing to time")
    if usage.prompt_tokens != expected:
        raise SystemExit(f"{client.base_url}: {usage.prompt_tokens} prompt tokens reported, {expected} sent")
    details = usage.prompt_tokens_details
    return Timed(first - clock.sent, first - called, details.cached_tokens if details else 0)


@dataclass
class Series:
    """One server's timed rounds; ``reuses``: whether its warm requests must reuse their prefix."""

    name: str
    server: Server
    reuses: bool
    cold: list[Timed] = field(default_factory=list)
    warm: list[Timed] = field(default_factory=list)
    clock: SendClock = field(default_factory=SendClock)
    # One client for all rounds, built here: an openai.OpenAI() takes some 30 ms to build, which
    # must not be timed, and a real client keeps its connection open between requests.
    client: openai.OpenAI = field(init=False)

    def __post_init__(self) -> None:
        self.client = self.clock.client(self.server)

    def run_round(self, prompts: Prompts, n: int, max_tokens: int) -> None:
        """Prefix ``n`` cold, then warm with another question; both checked, then kept."""
        cold_prompt, warm_prompt = prompts.prompt(n, 2 * n), prompts.prompt(n, 2 * n + 1)
        cold = time_to_first_token(self.clock, self.client, self.server.model, cold_prompt, max_tokens)
        warm = time_to_first_token(self.clock, self.client, self.server.model, warm_prompt, max_tokens)
        if cold.cached_tokens != 0:
            raise SystemExit(
                f"{self.name}: a cold request reported {cold.cached_tokens} cached tokens, not 0"
            )
        prefix = len(prompts.prefix(n))
        if self.reuses and not prefix <= warm.cached_tokens < len(warm_prompt):
            raise SystemExit(
                f"{self.name}: a warm request reported {warm.cached_tokens} cached tokens; "
                f"its prefix has {prefix}"
            )
        if not self.reuses and warm.cached_tokens != 0:
            raise SystemExit(
                f"{self.name}: a warm request reported {warm.cached_tokens} cached tokens, not 0"
            )
        self.cold.append(cold)
        self.warm.append(warm)


def context_length(model_dir: Path) -> int | None:
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("max_position_embeddings")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--prefix-tokens", type=int, default=2000, help="tokens of the shared prefix")
    parser.add_argument("--rounds", type=int, default=8, help="timed cold-and-warm pairs per server")
    parser.add_argument("--max-tokens", type=int, default=4, help="max_tokens of every request")
    parser.add_argument("--no-control", action="store_true", help="leave out the server without a cache")
    options = parser.parse_args()
    with (
        model_directory(options.model, options.shape) as model_dir,
        tempfile.TemporaryDirectory() as work,
        ExitStack() as running,
    ):
        prompts = build_prompts(model_dir, options.prefix_tokens, 2 * (options.rounds + 1))
        check_fits(prompts, options.max_tokens, context_length(model_dir))
        cached = running.enter_context(our_dispatcher(model_dir, Path(work)))
        series = [Series("prefix cache on (default)", cached, reuses=True)]
        if not options.no_control:
            off = running.enter_context(
                our_dispatcher(model_dir, Path(work), ["--prefix-cache-entries", "0"])
            )
            series.append(Series("prefix cache off (control)", off, reuses=False))
        run_rounds(series, prompts, options.rounds, options.max_tokens)
    report(model_dir, options.prefix_tokens, options.max_tokens, series)


def check_fits(prompts: Prompts, max_tokens: int, context: int | None) -> None:
    longest = len(prompts.prefix(0)) + max(len(q) for q in prompts.questions) + max_tokens
    if context is not None and longest > context:
        raise SystemExit(f"prompt and max_tokens reach {longest} tokens; the model's context is {context}")


def run_rounds(series: list[Series], prompts: Prompts, rounds: int, max_tokens: int) -> None:
    """One untimed pair per server, then ``rounds`` pairs, each round on every server in turn; every
    pair gets a prefix of its own."""
    prefixes = iter(range(len(prompts.first_tokens)))
    for one in series:
        one.run_round(prompts, next(prefixes), max_tokens)
        one.cold.clear()
        one.warm.clear()
    for _ in range(rounds):
        for one in series:
            one.run_round(prompts, next(prefixes), max_tokens)


def report(model_dir: Path, prefix_tokens: int, max_tokens: int, series: list[Series]) -> None:
    print(f"model: {model_dir}")
    print(f"prompt: a {prefix_tokens}-token prefix + a short question; max_tokens {max_tokens}")
    print(f"{len(series[0].cold)} rounds; median time to first token from sending the request")
    print(f"{'':28} {'cold ms':>9} {'warm ms':>9} {'warm/cold':>10} {'speed-up':>9} {'cached warm/cold':>17}")
    for one in series:
        cold, warm = median_ttft(one.cold), median_ttft(one.warm)
        cached = f"{statistics.median(t.cached_tokens for t in one.warm):.0f}/"
        cached += f"{max(t.cached_tokens for t in one.cold)}"
        print(
            f"{one.name:28} {cold * 1e3:>9.1f} {warm * 1e3:>9.1f} {warm / cold:>10.3f} "
            f"{cold / warm:>8.1f}x {cached:>17}"
        )
    print("the same from the openai SDK call (its request building included):")
    for one in series:
        cold, warm = median_ttft(one.cold, from_call=True), median_ttft(one.warm, from_call=True)
        print(
            f"{one.name:28} {cold * 1e3:>9.1f} {warm * 1e3:>9.1f} {warm / cold:>10.3f} {cold / warm:>8.1f}x"
        )


def median_ttft(runs: list[Timed], *, from_call: bool = False) -> float:
    return statistics.median(t.from_call if from_call else t.ttft for t in runs)


if __name__ == "__main__":
    main()

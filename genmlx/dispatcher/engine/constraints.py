"""Constrained decoding: a request's grammar (a JSON schema, any JSON object) masks every token its
output could not continue with, so the output always parses.

Built on llguidance (the grammar engine behind OpenAI's structured outputs): a request's grammar
becomes an ``LLMatcher`` over the model's tokenizer, held by the request's ``GrammarState``. The
mask is applied where the request's token is sampled (``RequestRow`` for a request alone,
``sample_held`` for a whole batch), after its penalties, so a constrained request decodes in the
same batch as free ones, one llguidance call computes every constrained row's mask (in parallel
on its own threads), and the batch's mask is applied once. Every rank of a group samples the same
rows from the same tokens, so all mask alike.

A row's mask needs the token it sampled last, which is still being computed when the next step's
graph is built: the state keeps that token as an array and reads it back only once the next step's
forward pass is under way, so the model computes while the masks are worked out. The masks are
llguidance's bitmasks, unpacked and applied with plain MLX operations, which run on every MLX
backend (llguidance's own MLX kernel is Metal only). Log-probabilities reported to clients are the
model's own, before the mask, as vLLM reports them by default.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from genmlx.dispatcher.engine.events import GenerationRequest

if TYPE_CHECKING:  # the HTTP side imports this module, and MLX is imported late there
    from genmlx.dispatcher.engine.sampling import RowSampler

log = logging.getLogger(__name__)

NEG_INF = float("-inf")


# Output laid out as ``json.dumps`` lays it out: no newlines or tabs between tokens for a model to
# wander through (a schema may say otherwise in its own "x-guidance").
LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar of JSON documents that validate against ``schema``."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(json.dumps({"x-guidance": LAYOUT, **schema}))


def lark_grammar(rules: str) -> str:
    """The llguidance grammar of a Lark grammar (llguidance's dialect, ``%json`` included)."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark(rules)


ANY_JSON_OBJECT = {"type": "object"}


class GrammarConstraints:
    """One model's grammar machinery: its tokenizer as llguidance sees it (built on first use, which
    takes about a second for a large vocabulary), grammar checks and per-request states."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._built: Any = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._built is None:
                import llguidance.hf

                eos = sorted(self._tokenizer.eos_token_ids)
                self._built = llguidance.hf.from_tokenizer(self._tokenizer._tokenizer, eos_token=eos)
            return self._built

    def problem(self, grammar: str) -> str | None:
        """Why ``grammar`` cannot be used (the construct at fault, in llguidance's words), or None."""
        from llguidance import LLMatcher

        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self._ll_tokenizer())
        return "; ".join(messages) if is_error else None

    def state(self, grammar: str) -> GrammarState:
        """A fresh place at the start of ``grammar``, for one request."""
        from llguidance import LLMatcher

        tokenizer = self._ll_tokenizer()
        return GrammarState(LLMatcher(tokenizer, grammar), tokenizer.vocab_size)


class GrammarState:
    """One request's place in its grammar. The token it was given last is kept as the array it is
    being sampled into (and its row there) until the next mask needs it."""

    def __init__(self, matcher: Any, vocabulary: int):
        self.matcher = matcher
        self.vocabulary = vocabulary  # the grammar engine's, which sizes the bitmask
        self._given: tuple[Any, int] | None = None

    def given(self, tokens: Any, row: int) -> None:
        """The request's next token is ``tokens[row]`` (perhaps not computed yet)."""
        self._given = (tokens, row)

    def catch_up(self, read: dict[int, list[int]]) -> None:
        """Consume the token given last; ``read`` holds the arrays already read back, by ``id``."""
        if self._given is None:
            return
        tokens, row = self._given
        self._given = None
        values = read.get(id(tokens))
        if values is None:
            values = read[id(tokens)] = tokens.tolist()
        if not self.matcher.consume_token(values[row]) and self.matcher.is_error():
            log.warning("a constrained row left its grammar: %s", self.matcher.get_error())


Sampler = Callable[[Any], Any]


def sample_held(logprobs: Any, states: Sequence[GrammarState | None], sample: Sampler) -> Any:
    """Sample ``logprobs`` (rows, vocabulary) with ``sample``, each row with a state held to its
    grammar (rows without one as they are), and give every state its row's token."""
    if any(states):
        logprobs = _masked(logprobs, states)
    tokens = sample(logprobs)
    for row, state in enumerate(states):
        if state is not None:
            state.given(tokens, row)
    return tokens


@dataclass(frozen=True)
class RequestRow:
    """One request's sampler and, when its output is constrained, its place in its grammar. Called
    with one row of log-probabilities where the request is sampled alone (a sequence's first token
    in a batch, a sequence decoded by itself)."""

    sampler: RowSampler
    grammar: GrammarState | None = None

    @classmethod
    def of(cls, request: GenerationRequest, constraints: GrammarConstraints | None) -> RequestRow:
        from genmlx.dispatcher.engine.sampling import RowSampler

        if request.grammar is None:
            return cls(RowSampler(request.sampling))
        if constraints is None:
            raise ValueError("a constrained request reached a decoder without a tokenizer")
        return cls(RowSampler(request.sampling), constraints.state(request.grammar))

    def __call__(self, logprobs: Any) -> Any:
        return sample_held(logprobs, [self.grammar], self.sampler)


def _masked(logprobs: Any, states: Sequence[GrammarState | None]) -> Any:
    """``logprobs`` with every token a row's grammar forbids at -inf (rows without one unchanged).

    The rows are not normalized again: what the samplers do is the same up to a constant per row
    (top-p normalizes for itself)."""
    import mlx.core as mx  # late, as everywhere the HTTP side may import from

    mx.async_eval(logprobs)  # the forward pass runs while the masks are worked out
    read: dict[int, list[int]] = {}
    for state in states:
        if state is not None:
            state.catch_up(read)
    allowed = np.unpackbits(
        _bitmask(states).view(np.uint8), axis=1, count=logprobs.shape[-1], bitorder="little"
    )
    allowed[[state is None for state in states]] = 1
    return mx.where(mx.array(allowed.view(np.bool_)), logprobs, NEG_INF)


def _bitmask(states: Sequence[GrammarState | None]) -> np.ndarray:
    """llguidance's masks of the constrained rows, 32 tokens to an int32, in one parallel call.
    Tokens past the grammar engine's vocabulary (a model's padded embedding) unpack as forbidden."""
    import llguidance.numpy

    constrained = [(row, state) for row, state in enumerate(states) if state is not None]
    bitmask = llguidance.numpy.allocate_token_bitmask(len(states), constrained[0][1].vocabulary)
    matchers = [(state.matcher, row) for row, state in constrained]
    llguidance.numpy.fill_next_token_bitmask_par(_executor(), matchers, bitmask)
    return bitmask


@functools.cache
def _executor() -> Any:
    """llguidance's thread pool for masks (one per process, its default size)."""
    from llguidance import LLExecutor

    return LLExecutor()


_BY_TOKENIZER: dict[int, GrammarConstraints] = {}


def constraints_for(tokenizer: Any) -> GrammarConstraints:
    """The one ``GrammarConstraints`` of a loaded tokenizer (it lives as long as the process)."""
    found = _BY_TOKENIZER.get(id(tokenizer))
    if found is None:
        found = _BY_TOKENIZER[id(tokenizer)] = GrammarConstraints(tokenizer)
    return found

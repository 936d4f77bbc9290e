"""Constrained decoding: a request's grammar (a JSON schema, any JSON object) masks every token its
output could not continue with, so the output always parses.

Built on llguidance (the grammar engine behind OpenAI's structured outputs): a request's grammar
becomes an ``LLMatcher`` over the model's tokenizer, and a logits processor of that request's row
asks it, before each token, which tokens may come next and consumes the token sampled after. The
processor belongs to one row, so a constrained request decodes in the same batch as free ones,
and every rank of a group runs the same processor on the same tokens, so all mask alike.

The masks are computed on the CPU as llguidance's bitmask and applied with plain MLX operations,
which run on every MLX backend (llguidance's own MLX kernel is Metal only).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

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
    takes about a second for a large vocabulary), grammar checks and per-request processors."""

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

    def processor(self, grammar: str) -> GrammarProcessor:
        """A fresh processor for one request's row."""
        from llguidance import LLMatcher

        return GrammarProcessor(LLMatcher(self._ll_tokenizer(), grammar))


class GrammarProcessor:
    """A logits processor holding one request's place in its grammar."""

    def __init__(self, matcher: Any):
        self._matcher = matcher
        self._started = False

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx  # late, as everywhere the HTTP side may import from

        if self._started:  # the last of ``tokens`` is the one sampled after the previous call
            # Start this step's forward pass before waiting for the previous token, so the model
            # computes while the mask is worked out.
            mx.async_eval(logits)
            self._matcher.consume_token(int(tokens.reshape(-1)[-1].item()))
        self._started = True
        return mx.where(mx.array(self._allowed(logits.shape[-1])), logits, NEG_INF)

    def _allowed(self, vocabulary: int) -> np.ndarray:
        bits = np.unpackbits(
            np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little"
        )
        allowed = np.zeros(vocabulary, dtype=bool)
        known = min(vocabulary, bits.size)
        allowed[:known] = bits[:known]
        return allowed


_BY_TOKENIZER: dict[int, GrammarConstraints] = {}


def constraints_for(tokenizer: Any) -> GrammarConstraints:
    """The one ``GrammarConstraints`` of a loaded tokenizer (it lives as long as the process)."""
    found = _BY_TOKENIZER.get(id(tokenizer))
    if found is None:
        found = _BY_TOKENIZER[id(tokenizer)] = GrammarConstraints(tokenizer)
    return found

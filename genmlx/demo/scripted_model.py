"""A demo model that writes a given text: tool calls and thinking, end to end, through a real model.

A random-weight model never writes ``<tool_call>...</tool_call>`` or ``<think>...</think>``, so tests
of the parsers behind the API would need a fake; this model writes them for real, through the real
architecture, tokenizer, sampler and detokenizer.

How: a bigram chain through the embedding and the output head. Each distinct token of the text gets
a one-hot embedding direction, every other token shares one "start" direction; the attention and MLP
output projections are zero, so the residual stream at a position is its token's embedding, and the
output head maps the direction of token ``t_i`` to ``t_{i+1}`` (and the start direction to ``t_1``, the
last token to end-of-turn). So after any prompt that ends in a token outside the text, greedy
decoding writes the text and ends the turn; the margin is wide enough that sampling does too.

Limitation: the next token depends on the previous token only, so a text whose token repeats with two
different successors cannot be written; ``write_scripted_model_files`` raises ``ValueError`` naming it.
The tokenizer is trained on the usual corpus plus the text itself (so its words and punctuation runs
become single tokens), with ``<think>``, ``</think>``, ``<tool_call>`` and ``</tool_call>`` as tokens of
their own, which also makes mlx-lm see a thinking model.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from genmlx.demo.random_model import (
    CORPUS,
    END_OF_TURN,
    SPECIAL_TOKENS,
    model_config,
    tokenizer_config,
    train_tokenizer,
    write_json,
    write_marker,
    write_model_atomically,
    write_tokenizer_files,
)

MARKER_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>")
# Repetitions of the text in the tokenizer's training corpus: enough for BPE to merge each of its
# pre-tokens into one token.
TEXT_REPEATS = 64
VOCAB_SIZE = 1536
# Logit of the scripted next token (all others are 0): e^-24 per token leaves sampling no real choice.
NEXT_TOKEN_LOGIT = 24.0


def write_scripted_model(path: Path, text: str, *, seed: int = 0) -> Path:
    """Write a demo model that, at temperature 0, answers any prompt with ``text`` (see this
    module's docstring for how, and for which texts it can write)."""
    write_files = partial(write_scripted_model_files, text=text, seed=seed)
    return write_model_atomically(Path(path), write_files, expected={"weights": "scripted", "text": text})


def write_scripted_model_files(directory: Path, text: str, seed: int) -> None:
    """Write the files of a model that writes ``text`` (see the module docstring) into ``directory``."""
    tokenizer = _scripted_tokenizer(text)
    vocab = tokenizer.get_vocab()
    chain = tokenizer.encode(text, add_special_tokens=False).ids
    successors = _successors(chain, vocab[END_OF_TURN], tokenizer.id_to_token)
    special_ids = {token: vocab[token] for token in SPECIAL_TOKENS}
    config = model_config(tokenizer.get_vocab_size(), special_ids)
    config.update(_scripted_dimensions(len(successors)))
    write_json(directory / "config.json", config)
    _write_chain_weights(directory / "model.safetensors", config, chain[0], successors)
    settings = tokenizer_config(special_ids)
    settings["added_tokens_decoder"].update(_marker_tokens_config(vocab))
    write_tokenizer_files(directory, tokenizer, settings)
    (directory / "README.md").write_text(
        "# GenMLX scripted demo model\n\nAt temperature 0 this tiny llama answers any prompt with:\n\n"
        f"```\n{text}\n```\n"
    )
    write_marker(directory, seed, weights="scripted", note="This model writes one fixed text.", text=text)


def _scripted_tokenizer(text: str):
    from tokenizers import AddedToken

    corpus = CORPUS + (text + "\n") * TEXT_REPEATS
    tokenizer = train_tokenizer(corpus, VOCAB_SIZE)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKER_TOKENS])
    return tokenizer


def _successors(chain: list[int], end_of_turn: int, name_of) -> dict[int, int]:
    """Each token of the text mapped to the token that follows it (end-of-turn after the last)."""
    if not chain:
        raise ValueError("a scripted model needs a non-empty text")
    successors: dict[int, int] = {}
    for token, following in zip(chain, [*chain[1:], end_of_turn], strict=True):
        if successors.setdefault(token, following) != following:
            raise ValueError(
                f"token {name_of(token)!r} is followed by two different tokens in the text; a bigram "
                "chain cannot write it (change the text, e.g. its spacing, so each token repeats with "
                "the same successor)"
            )
    return successors


def _scripted_dimensions(distinct_tokens: int) -> dict:
    # One direction per distinct token plus the start direction, in whole heads of 16.
    hidden = 64 * -(-(distinct_tokens + 1) // 64)
    return {"hidden_size": hidden, "num_hidden_layers": 1, "intermediate_size": 64}


def _write_chain_weights(path: Path, config: dict, first: int, successors: dict[int, int]) -> None:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(config))
    vocab_size, hidden = config["vocab_size"], config["hidden_size"]
    embedding = np.zeros((vocab_size, hidden), np.float32)
    head = np.zeros((vocab_size, hidden), np.float32)
    embedding[:, 0] = 1.0  # direction 0 is "start": every token outside the text
    head[first, 0] = NEXT_TOKEN_LOGIT
    for direction, (token, following) in enumerate(successors.items(), start=1):
        embedding[token] = 0.0
        embedding[token, direction] = 1.0
        head[following, direction] = NEXT_TOKEN_LOGIT
    # The final RMS norm scales a one-hot row to sqrt(hidden); undo it so logits are as set above.
    model.model.embed_tokens.weight = mx.array(embedding)
    model.lm_head.weight = mx.array(head / np.sqrt(hidden))
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
    weights = dict(sorted(tree_flatten(model.parameters())))
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def _marker_tokens_config(vocab: dict[str, int]) -> dict:
    return {
        str(vocab[token]): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": False,
        }
        for token in MARKER_TOKENS
    }

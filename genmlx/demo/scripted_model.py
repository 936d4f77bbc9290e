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

A second text for after a tool result (``after_tool``): the chat template wraps each tool result in
``<tool_response>``, a token of its own with its own embedding direction. One attention head looks
for it: the query is set only at "start" positions (the generation prompt's last token), the key only
at ``<tool_response>`` (so its score beats a whole context of zero scores), the value writes a "tool
seen" direction into the residual stream. The output head maps start plus "tool seen" to the second
text's first token instead of the first's; the rest of both texts is one bigram chain. RoPE would
turn that score with distance, so the scripted model's ``rope_theta`` is large enough that the
slowest rotating pair, which the head uses, hardly turns across the whole context.

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

TOOL_RESULT_MARKER = "<tool_response>"
MARKER_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", TOOL_RESULT_MARKER)
# Repetitions of the text in the tokenizer's training corpus: enough for BPE to merge each of its
# pre-tokens into one token.
TEXT_REPEATS = 64
VOCAB_SIZE = 1536
# Logit of the scripted next token (all others are 0): e^-24 per token leaves sampling no real choice.
NEXT_TOKEN_LOGIT = 24.0
# Attention score of the tool-result marker against zero for every other token: e^40 outweighs any
# context length, so at a start position the head reads the marker and nothing else.
MARKER_SCORE = 40.0
# The slowest RoPE pair turns by position * theta^-(d-2)/d: about 1e-3 radians over 64k tokens here.
SCRIPTED_ROPE_THETA = 1e12
# Residual directions: start (every token outside the texts), the tool-result marker, "tool seen"
# (written by attention), then one per distinct token of the texts.
START, MARKER, TOOL_SEEN, FIRST_TOKEN_DIRECTION = 0, 1, 2, 3


def write_scripted_model(path: Path, text: str, *, after_tool: str | None = None, seed: int = 0) -> Path:
    """Write a demo model that, at temperature 0, answers any prompt with ``text``, or with
    ``after_tool`` once the conversation holds a tool result (see this module's docstring for how,
    and for which texts it can write)."""
    write_files = partial(write_scripted_model_files, text=text, after_tool=after_tool, seed=seed)
    expected = {"weights": "scripted", "text": text, "after_tool": after_tool}
    return write_model_atomically(Path(path), write_files, expected=expected)


def write_scripted_model_files(directory: Path, text: str, seed: int, after_tool: str | None = None) -> None:
    """Write the files of a model that writes ``text`` (see the module docstring) into ``directory``."""
    tokenizer = _scripted_tokenizer([text] if after_tool is None else [text, after_tool])
    vocab = tokenizer.get_vocab()
    chains = [tokenizer.encode(t, add_special_tokens=False).ids for t in (text, after_tool) if t is not None]
    successors = _successors(chains, vocab[END_OF_TURN], tokenizer.id_to_token)
    special_ids = {token: vocab[token] for token in SPECIAL_TOKENS}
    config = model_config(tokenizer.get_vocab_size(), special_ids)
    config.update(_scripted_dimensions(len(successors)))
    write_json(directory / "config.json", config)
    firsts = [chain[0] for chain in chains]
    _write_chain_weights(
        directory / "model.safetensors", config, firsts, successors, vocab[TOOL_RESULT_MARKER]
    )
    settings = tokenizer_config(special_ids)
    settings["added_tokens_decoder"].update(_marker_tokens_config(vocab))
    write_tokenizer_files(directory, tokenizer, settings)
    write_readme(directory, text, after_tool)
    extra = {} if after_tool is None else {"after_tool": after_tool}
    note = "This model writes one fixed text." if after_tool is None else "This model writes two fixed texts."
    write_marker(directory, seed, weights="scripted", note=note, text=text, **extra)


def write_readme(directory: Path, text: str, after_tool: str | None) -> None:
    readme = "# GenMLX scripted demo model\n\nAt temperature 0 this tiny llama answers any prompt with:\n\n"
    readme += f"```\n{text}\n```\n"
    if after_tool is not None:
        readme += f"\nand, once the conversation holds a tool result, with:\n\n```\n{after_tool}\n```\n"
    (directory / "README.md").write_text(readme)


def _scripted_tokenizer(texts: list[str]):
    from tokenizers import AddedToken

    corpus = CORPUS + "".join((text + "\n") * TEXT_REPEATS for text in texts)
    tokenizer = train_tokenizer(corpus, VOCAB_SIZE)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKER_TOKENS])
    return tokenizer


def _successors(chains: list[list[int]], end_of_turn: int, name_of) -> dict[int, int]:
    """Each token of the texts mapped to the token that follows it (end-of-turn after each last)."""
    if not all(chains):
        raise ValueError("a scripted model needs a non-empty text")
    successors: dict[int, int] = {}
    pairs = [pair for chain in chains for pair in zip(chain, [*chain[1:], end_of_turn], strict=True)]
    for token, following in pairs:
        if successors.setdefault(token, following) != following:
            raise ValueError(
                f"token {name_of(token)!r} is followed by two different tokens in the text; a bigram "
                "chain cannot write it (change the text, e.g. its spacing, so each token repeats with "
                "the same successor)"
            )
    return successors


def _scripted_dimensions(distinct_tokens: int) -> dict:
    # One direction per distinct token, plus start, tool-result marker and "tool seen", in whole heads.
    hidden = 64 * -(-(distinct_tokens + 3) // 64)
    return {
        "hidden_size": hidden,
        "num_hidden_layers": 1,
        "intermediate_size": 64,
        "rope_theta": SCRIPTED_ROPE_THETA,
    }


def _write_chain_weights(
    path: Path, config: dict, firsts: list[int], successors: dict[int, int], marker: int
) -> None:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(config))
    vocab_size, hidden = config["vocab_size"], config["hidden_size"]
    embedding = np.zeros((vocab_size, hidden), np.float32)
    head = np.zeros((vocab_size, hidden), np.float32)
    embedding[:, START] = 1.0  # every token outside the texts
    head[firsts[0], START] = NEXT_TOKEN_LOGIT
    for direction, (token, following) in enumerate(successors.items(), start=FIRST_TOKEN_DIRECTION):
        embedding[token] = 0.0
        embedding[token, direction] = 1.0
        head[following, direction] = NEXT_TOKEN_LOGIT
    embedding[marker] = 0.0
    embedding[marker, MARKER] = 1.0
    head[firsts[0], MARKER] = NEXT_TOKEN_LOGIT  # as for start, should a prompt end in the marker
    if len(firsts) == 2:
        # Start plus "tool seen" (both 1, then normed by sqrt 2): the second text's first token wins.
        head[firsts[0], TOOL_SEEN] = -NEXT_TOKEN_LOGIT
        head[firsts[1], TOOL_SEEN] = 2 * NEXT_TOKEN_LOGIT
    # The final RMS norm scales a one-hot row to sqrt(hidden); undo it so logits are as set above.
    model.model.embed_tokens.weight = mx.array(embedding)
    model.lm_head.weight = mx.array(head / np.sqrt(hidden))
    for layer in model.model.layers:
        _set_marker_head(layer.self_attn, config)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
    weights = dict(sorted(tree_flatten(model.parameters())))
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def _set_marker_head(attention, config: dict) -> None:
    """Query head 0 at start positions looks for the tool-result marker and writes "tool seen"."""
    import mlx.core as mx
    import numpy as np

    hidden = config["hidden_size"]
    head_dim = hidden // config["num_attention_heads"]
    # The input norm scales a one-hot row to sqrt(hidden); query and key each carry half the score.
    weight = np.sqrt(MARKER_SCORE * np.sqrt(head_dim)) / hidden**0.5
    slowest = head_dim - 1  # pairs with head_dim/2 - 1: the lowest RoPE frequency
    query = np.zeros(attention.q_proj.weight.shape, np.float32)
    key = np.zeros(attention.k_proj.weight.shape, np.float32)
    value = np.zeros(attention.v_proj.weight.shape, np.float32)
    output = np.zeros(attention.o_proj.weight.shape, np.float32)
    query[slowest, START] = weight
    key[slowest, MARKER] = weight
    value[0, MARKER] = 1.0 / np.sqrt(hidden)
    output[TOOL_SEEN, 0] = 1.0
    attention.q_proj.weight = mx.array(query)
    attention.k_proj.weight = mx.array(key)
    attention.v_proj.weight = mx.array(value)
    attention.o_proj.weight = mx.array(output)


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

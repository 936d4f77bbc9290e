"""Parsed requests to prompt token ids and a completion budget, with the model's own tokenizer.

Runs on the event loop (tokenizing is quick), so a prompt that does not fit is refused with a 400
before anything is queued.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from genmlx.core.errors import ContextLengthExceeded, InvalidRequest
from genmlx.dispatcher.api.chat import ChatMessage, FunctionTool

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

# Without max_tokens a completion may use the rest of the context, but not more than this: a model
# that never ends its turn should not hold the single model thread for minutes by default.
DEFAULT_MAX_TOKENS = 4096

# A conversation with a system turn after the first exchange, each turn's text a marker to find.
_MID_SYSTEM_PROBE = (
    {"role": "user", "content": "genmlx-probe-user"},
    {"role": "assistant", "content": "genmlx-probe-assistant"},
    {"role": "system", "content": "genmlx-probe-system"},
    {"role": "user", "content": "genmlx-probe-again"},
)


def chat_prompt_tokens(
    tokenizer: TokenizerWrapper, messages: tuple[ChatMessage, ...], tools: tuple[FunctionTool, ...] = ()
) -> tuple[int, ...]:
    """Render ``messages`` (and the ``tools`` on offer) with the model's chat template, ready for the
    assistant's turn."""
    if not tokenizer.has_chat_template:
        raise InvalidRequest(
            "This model has no chat template; use /v1/completions with a plain prompt.", param="messages"
        )
    if tools and not tokenizer.has_tool_calling:
        raise InvalidRequest(
            "This model has no tool-call format that mlx-lm parses, so it cannot be offered tools.",
            param="tools",
        )
    conversation = [m.template_json() for m in messages]
    template_tools = [tool.template_json() for tool in tools] or None
    try:
        text = tokenizer.apply_chat_template(
            conversation, tools=template_tools, tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # jinja's TemplateError and whatever a template chooses to raise
        raise InvalidRequest(f"The chat template rejected these messages: {e}", param="messages") from None
    # The template writes the special tokens (BOS included) itself.
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def system_prompt_boundary(
    tokenizer: TokenizerWrapper,
    messages: tuple[ChatMessage, ...],
    tools: tuple[FunctionTool, ...],
    prompt: tuple[int, ...],
) -> int | None:
    """Where the leading system turns and the tool list end in ``prompt`` (the chat template's
    rendering of them alone, where it is a prefix of the whole): the part every conversation with
    the same instructions shares. None where there are none, or the template renders them
    differently on their own."""
    leading = next(
        (i for i, m in enumerate(messages) if m.role not in ("system", "developer")), len(messages)
    )
    if not leading and not tools:
        return None
    conversation = [m.template_json() for m in messages[:leading]]
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            tools=[t.template_json() for t in tools] or None,
            tokenize=False,
            add_generation_prompt=False,
        )
    except Exception:  # a template that wants a user turn: no boundary, nothing lost
        return None
    shared = tokenizer.encode(text, add_special_tokens=False)
    if 0 < len(shared) < len(prompt) and tuple(shared) == prompt[: len(shared)]:
        return len(shared)
    return None


@lru_cache(maxsize=4)
def template_takes_system_anywhere(tokenizer: TokenizerWrapper) -> bool:
    """Whether the chat template renders a system turn after the first position, in its place: some
    raise (roles must alternate, or a system turn only first), some drop or move it."""
    try:
        text = tokenizer.apply_chat_template(
            [dict(turn) for turn in _MID_SYSTEM_PROBE], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # jinja's TemplateError and whatever a template chooses to raise
        return False
    places = [text.find(turn["content"]) for turn in _MID_SYSTEM_PROBE]
    return -1 not in places and places == sorted(places)


def completion_prompt_tokens(tokenizer: TokenizerWrapper, prompt: str | tuple[int, ...]) -> tuple[int, ...]:
    """Tokenize a text prompt (with BOS where the tokenizer adds one) or check given token ids."""
    if isinstance(prompt, str):
        return tuple(tokenizer.encode(prompt))
    vocab_size = len(tokenizer)
    if any(token >= vocab_size for token in prompt):
        raise InvalidRequest(
            f"'prompt' holds token ids outside the vocabulary (size {vocab_size}).", param="prompt"
        )
    return prompt


def completion_budget(
    prompt_length: int,
    requested: int | None,
    context_length: int | None,
    *,
    prompt_field: str,
    context_length_set: bool = False,
) -> int:
    """How many tokens to generate at most: ``requested`` if it fits, else a 400 that says why.

    ``prompt_field`` names the request field a too-long prompt came from (``messages``/``prompt``);
    ``context_length_set`` says the limit is the manifest's ``serving.contextLength``, not the model's.
    """
    room = None if context_length is None else context_length - prompt_length
    if room is not None and room < 1:
        limit = context_limit(context_length, context_length_set)
        raise ContextLengthExceeded(
            f"{limit}; the prompt alone has {prompt_length}. Shorten the prompt.", param=prompt_field
        )
    if requested is None:
        return DEFAULT_MAX_TOKENS if room is None else min(DEFAULT_MAX_TOKENS, room)
    if room is not None and requested > room:
        limit = context_limit(context_length, context_length_set)
        raise ContextLengthExceeded(
            f"{limit}; the prompt has {prompt_length} and {requested} more were requested. "
            "Lower max_tokens or shorten the prompt.",
            param="max_tokens",
        )
    return requested


def context_limit(context_length: int, set_in_manifest: bool) -> str:
    """The served context length and where it comes from, so the error says which knob moves it."""
    if set_in_manifest:
        return (
            f"This model is served with a context length of {context_length} tokens, "
            "set by serving.contextLength in the cluster manifest"
        )
    return (
        f"This model's context length is {context_length} tokens, the model's own limit "
        "(max_position_embeddings); serving.contextLength in the cluster manifest sets another"
    )

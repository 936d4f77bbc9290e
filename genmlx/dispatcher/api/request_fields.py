"""Every field of OpenAI's ``CreateChatCompletionRequest`` and ``CreateCompletionRequest``, sorted
into three kinds, so that none is silently dropped (tests check the sets against the spec):

- honoured: read by ``request_parsing`` and acted on. Some are honoured for the values this
  server can serve and a 400 for the rest (``n`` 1, ``best_of`` 1, ``echo`` false,
  ``modalities`` text; ``response_format`` text, json_object and json_schema).
- ignored: accepted because honouring them would change nothing a client can see here; each says
  why.
- refused: a 400 naming the field whenever it asks for something (``REFUSED_FIELDS``).
"""

from __future__ import annotations

CHAT_HONOURED = frozenset(
    {
        "model",
        "messages",
        "max_completion_tokens",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "stop",
        "stream",
        "stream_options",  # include_usage; include_obfuscation asks for padding we never send
        "logprobs",
        "top_logprobs",
        "n",
        "tools",
        "tool_choice",
        "parallel_tool_calls",  # false: only the reply's first tool call is kept
        "response_format",
        "modalities",
    }
)
COMPLETION_HONOURED = frozenset(
    {
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "stop",
        "stream",
        "stream_options",
        "logprobs",
        "n",
        "best_of",
        "echo",
    }
)
IGNORED_FIELDS = {
    "user": "an end-user id for OpenAI's abuse monitoring; nothing here monitors or reports on it",
    "safety_identifier": "the same as user, under its newer name",
    "metadata": "tags for stored completions; this server stores none",
    "store": "stored completions: this server keeps none and serves no endpoint to read them back",
    "service_tier": "there is one tier here; the reply says it served at 'default'",
    "prompt_cache_key": "a routing hint for OpenAI's prompt cache; the prefix cache here reuses any "
    "shared prefix without a key, and cached_tokens in usage reports what it reused",
    "prompt_cache_retention": "how long OpenAI keeps a cached prefix; here the prefix cache lives in "
    "the dispatcher's memory and is evicted by size",
    "prompt_cache_options": "the same as prompt_cache_retention, as an object",
    "reasoning_effort": "a hint for OpenAI's reasoning models; here the model's own chat template "
    "decides whether it thinks, and no reply field reports the effort",
    "verbosity": "a hint on the reply's length for OpenAI's models; nothing in a reply reports it",
}
# Fields that would change the reply if honoured: refused, with the reason. An empty list or map
# under ``EMPTY_IS_ABSENT`` asks for nothing and is accepted.
REFUSED_FIELDS = {
    "logit_bias": "'logit_bias' is not supported by this server.",
    "functions": "The legacy 'functions' field is not supported; send 'tools'.",
    "function_call": "The legacy 'function_call' field is not supported; send 'tool_choice'.",
    "audio": "Audio output is not supported by this server.",
    "prediction": "Predicted outputs are not supported by this server.",
    "web_search_options": "Web search is not supported by this server.",
    "moderation": "Moderating replies is not supported by this server.",
    "suffix": "'suffix' (insertion) is not supported by this server.",
}
EMPTY_IS_ABSENT = frozenset({"logit_bias", "functions"})

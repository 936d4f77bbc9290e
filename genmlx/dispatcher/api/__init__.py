"""Rank 0's HTTP surface: the OpenAI (``handlers``, ``request_parsing``, ``openai_format``) and
Anthropic (``anthropic_*``) APIs, prompts and replies (``prompts``, ``chat``, ``reply_parsing``) and
``/metrics``. Handlers parse, submit to ``genmlx.dispatcher.engine`` and format its typed events.
"""

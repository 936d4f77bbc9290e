"""The model thread of one rank (``runner``): loading shards, continuous batching (``decoding``,
``sampling``, ``prefix_cache``), tokens to typed events (``generation``, ``events``) and the ranks of
a group in lockstep (``lockstep``). Knows nothing of HTTP.
"""

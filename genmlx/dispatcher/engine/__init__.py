"""The model thread of one rank (``runner``, with rank 0's scheduling loop in ``leader``): loading
shards, continuous batching (``decoding``, ``sampling``, ``prefix_cache``), tokens to typed events
(``generation``, ``events``) and the ranks of a group in lockstep (``lockstep``). Knows nothing of
HTTP.
"""

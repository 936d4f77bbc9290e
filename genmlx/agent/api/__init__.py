"""The agent's HTTP API on port 6790 (``server``): state, rank launches, fetches, and stored model
files served to peers (``model_api``). Every endpoint but ``/healthz`` takes signed requests only.
"""

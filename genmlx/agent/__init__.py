"""The agent: one small daemon per node that reports what the node is and holds, and starts and
stops the dispatcher ranks the master asks for.

Contract: an HTTP API on port 6790 (``server``) that answers only requests carrying the cluster's
bearer token, apart from ``GET /healthz``. It reports ``genmlx.node_state.AgentState`` (node facts,
the model directories in each storage path, the ranks it started) and takes ``RankLaunch`` requests,
each of which becomes one ``python -m genmlx.dispatcher`` process in its own process group. The agent
decides nothing by itself: a rank that exits stays reported as exited until the master stops or
replaces it. Entry points for the CLI are in ``run`` (``run_agent``, ``start_agent``).
"""

"""The agent: one small daemon per node that reports what the node is and holds, and starts and
stops the dispatcher ranks the master asks for.

Contract: an HTTP API on port 6790 (``api``) that answers only requests signed with the cluster
token's key (``genmlx.core.signing``), apart from ``GET /healthz``, and signs its answers. It
reports ``genmlx.wire.agent_state.AgentState`` (node facts,
the model directories in each storage path, the ranks it started) and takes ``RankLaunch`` requests,
each of which becomes one ``python -m genmlx.dispatcher`` process in its own process group. The agent
decides nothing by itself: a rank that exits stays reported as exited until the master stops or
replaces it. It also takes ``FetchRequest``s, each a background download or peer sync into one of its
storage paths that is published only once every file verifies (``transfers``, ``store``), and serves
its stored models' files to other agents. ``ranks`` supervises the dispatcher processes, ``facts``
reads what the node is, ``telemetry`` samples what it is doing (the last five minutes, served).
Entry points for the CLI are in ``run`` (``run_agent``, ``start_agent``); ``announce`` publishes
the agent on zeroconf. It imports nothing from ``genmlx.master`` or
``genmlx.dispatcher``.
"""

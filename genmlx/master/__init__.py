"""The master: reconciles the applied manifest with what the agents report.

Each pass observes every agent (``runtime.observe``), decides what to do with the pure
``planning.plan(desired, observed)``, carries the actions out through the agent client
(``runtime.execute``) and derives Kubernetes-style conditions (``planning.status``); ``api`` serves
status, apply and the OpenAI router, ``run`` starts it all. Triggers only wake the loop; a pass
always re-reads everything, so a lost or repeated trigger costs nothing. The master talks
to agents and dispatchers over HTTP only and imports nothing from ``genmlx.agent`` or
``genmlx.dispatcher``.
"""

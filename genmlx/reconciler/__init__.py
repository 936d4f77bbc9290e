"""The master: reconciles the applied manifest with what the agents report.

Each pass observes every agent (``observe``), decides what to do with the pure
``plan(desired, observed)``, carries the actions out through the agent client (``execute``)
and derives Kubernetes-style conditions (``status``). Triggers only wake the loop; a pass
always re-reads everything, so a lost or repeated trigger costs nothing. The reconciler talks
to agents and dispatchers over HTTP only and imports nothing from ``genmlx.agent`` or
``genmlx.dispatcher``.
"""

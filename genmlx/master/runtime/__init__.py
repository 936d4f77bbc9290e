"""The master's moving parts: the reconcile loop (``loop``), observing agents (``observe``,
``agent_client``, ``discovery``, ``canary``), carrying actions out (``execute``), the applied
manifest and its revision (``applied``, ``watch``) and the event history (``events``). Built on
``genmlx.master.planning``; knows nothing of HTTP handlers.
"""

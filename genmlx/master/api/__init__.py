"""The master's HTTP surface on port 6789: the status and apply API (``server``, ``report``,
``stream``), the OpenAI router that proxies ``/v1/*`` to a model's rank 0 (``proxy``) and the
read-only status page (``ui_handlers``, ``ui_auth``). Asks the runtime through its public methods.
"""

"""The dispatcher: one process per rank of a served model, built on mlx-lm.

Contract: ``python -m genmlx.dispatcher --model DIR --name ID --port P`` serves the model in DIR as
``ID`` behind an OpenAI-compatible API (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``)
plus ``GET /health`` (503 while loading, 200 when ready). If ``GENMLX_API_TOKEN`` is set, ``/v1/*``
requires it as a bearer token. It exits 0 on SIGTERM/SIGINT, 1 if the model cannot be loaded, and
by itself when ``--parent-pid`` is no longer its parent. One thread owns the model; the tornado
event loop owns the sockets. Only one rank (``--world-size 1``) is implemented so far.

It imports nothing from ``genmlx.agent`` or ``genmlx.reconciler``; modules: ``settings`` (command
line), ``server`` (process lifecycle), ``handlers`` (HTTP), ``request_parsing``, ``prompts``,
``openai_format``, ``engine`` (model thread), ``generation`` (token loop), ``sampling``,
``stop_strings``, ``events`` (types shared by HTTP and engine), ``api_errors``, ``watchdog``.
"""

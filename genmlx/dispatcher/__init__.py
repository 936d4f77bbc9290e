"""The dispatcher: one process per rank of a served model, built on mlx-lm.

Contract: ``python -m genmlx.dispatcher --model DIR --name ID --port P`` serves the model in DIR as
``ID`` behind an OpenAI-compatible API (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``),
Anthropic's ``/v1/messages`` and Prometheus ``/metrics``, plus ``GET /health`` (503 while loading,
200 when ready). If ``GENMLX_API_TOKEN`` is set, everything but ``/health`` requires it. It exits 0
on SIGTERM/SIGINT, 1 if the model cannot be loaded or its rank group broke, and by itself when
``--parent-pid`` is no longer its parent. With ``--world-size N --rank R --hostfile F`` it is one
rank of a tensor or pipeline parallel group; rank 0 serves HTTP, the others only ``/health``.
One thread owns the model and decodes admitted requests as one batch; the tornado event loop owns
the sockets.

It imports nothing from ``genmlx.agent`` or ``genmlx.master``. ``settings`` reads the command line,
``server`` runs the process, ``api`` is rank 0's HTTP surface and ``engine`` the model thread; the
API imports the engine, never the reverse.
"""

"""The top layer: the ``genmlx`` command (``main``) and what only a user's terminal needs — the
master's client (``master_client``), ``apply --wait`` (``apply_wait``), one-process clusters for
``genmlx up`` and ``genmlx demo`` (``local_cluster``), ``genmlx mesh plan`` (``mesh_report``) and
``genmlx mesh apply`` (``mesh_apply``, over macOS's ``networksetup``: ``networksetup``).
Nothing imports it but ``genmlx.__main__`` and ``genmlx.agent.__main__``.
"""

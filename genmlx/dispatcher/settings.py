"""The dispatcher's command line: ``genmlx.wire.rank_launch.RankCommand``, the same field list the
agent writes it from, read once into that frozen dataclass."""

from __future__ import annotations

import argparse

from genmlx.dispatcher.engine.decoding import DecoderSettings
from genmlx.wire.argv import from_argv
from genmlx.wire.rank_launch import RankCommand


def parse_settings(argv: list[str]) -> RankCommand:
    """Parse ``python -m genmlx.dispatcher`` arguments; exits with a usage message on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m genmlx.dispatcher",
        description="Serve one model rank with mlx-lm behind an OpenAI-compatible API.",
    )
    return from_argv(RankCommand, argv, parser)


def decoder_settings(settings: RankCommand) -> DecoderSettings:
    """What the decoder needs of the command line; knobs left out keep ``DecoderSettings``' defaults."""
    given = {
        "max_batch": settings.serving.max_batch,
        "prefill_chunk": settings.prefill_chunk,
        "cache_entries": settings.prefix_cache_entries,
        "cache_bytes": None if settings.prefix_cache_gb is None else int(settings.prefix_cache_gb * 2**30),
    }
    return DecoderSettings(**{name: value for name, value in given.items() if value is not None})

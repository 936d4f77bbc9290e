"""The master's pure core: ``plan(desired, observed) -> list[Action]`` and everything it is built
from (presence, placement, mesh, rank groups, prune) and the conditions derived from the same
assessments (``status``). No I/O, no clock, no globals: time comes in as data. Imports only
``genmlx.manifest``, ``genmlx.wire`` and ``genmlx.core``.
"""

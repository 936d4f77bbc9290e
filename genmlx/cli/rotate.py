"""``genmlx token rotate``: a new cluster token, the old one kept for a grace window.

Run it where the master's token file is. The master takes the new token within a second and, on
its next pass, gives it to every agent still on the old one, sealed for that node (``--manual``:
nothing is pushed; copy the file to each node). Until the window ends both tokens count
everywhere, and ``genmlx status`` lists the nodes still on the old one; after it the old token is
refused, and a node that was away needs the file copied to it by hand.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from genmlx.core.errors import GenMLXError
from genmlx.core.signing import Keys
from genmlx.core.tokens import read_token_file, rotated, write_token_file

GRACE = re.compile(r"^(\d+)([smhd])$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class RotationRefused(GenMLXError):
    """A rotation that would lose a token still in use, or a grace that does not parse."""


def grace_seconds(text: str) -> float:
    match = GRACE.match(text)
    if match is None or int(match[1]) == 0:
        raise RotationRefused(f"--grace {text!r}: give a time such as 90s, 30m, 1h or 2d")
    return int(match[1]) * UNIT_SECONDS[match[2]]


def rotate_token(path: Path, grace: str, manual: bool, now: float | None = None) -> int:
    now = time.time() if now is None else now
    held = read_token_file(path)
    if len(held.tokens(now)) > 1:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.previous_until))
        raise RotationRefused(
            f"a rotation is under way until {until}: the token before it still counts, and another "
            "rotation now would cut off the nodes that hold it. Rotate again after that."
        )
    new = rotated(held, grace_seconds(grace), manual, now)
    write_token_file(path, new)
    until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(new.previous_until))
    print(f"rotated the cluster token in {path} (new key id {Keys.of(new.current).signing_id})")
    print(f"the old token still counts until {until}.")
    if manual:
        print(f"Copy {path} to every node's token file (~/.genmlx/token) before then: each process")
        print("takes it within a second, without a restart.")
    else:
        print("The master gives it to every agent, sealed for each node; a node that is away until")
        print(f"then needs {path} copied to it by hand.")
    print("`genmlx status` lists the nodes still on the old token.")
    return 0

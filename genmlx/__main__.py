"""``python -m genmlx`` is the ``genmlx`` command."""

import sys

from genmlx.cli import main

sys.exit(main())

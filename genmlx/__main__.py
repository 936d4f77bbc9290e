"""``python -m genmlx`` is the ``genmlx`` command."""

import sys

from genmlx.cli.main import main

sys.exit(main())

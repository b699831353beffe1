"""``python -m zkv``: the command-line client."""

import sys

from zkv.cli import main

sys.exit(main())

"""``python -m firmware_tools.agent``: see :mod:`firmware_tools.agent`."""

import sys

from firmware_tools.agent.cli import main

sys.exit(main())

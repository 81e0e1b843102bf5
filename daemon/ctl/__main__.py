"""``python -m daemon.ctl``: the same as ``loractl``."""

import sys

from daemon.ctl import main

sys.exit(main())

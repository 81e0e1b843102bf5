"""``python -m lorad.daemon.ctl``: the same as ``loractl``."""

import sys

from lorad.daemon.ctl import main

sys.exit(main())

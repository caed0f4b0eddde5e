"""``python -m snrmon.cli``: the ``snrmon`` command."""

import sys

from snrmon.cli.main import main

sys.exit(main())

"""``python -m mtekvm``: the ``mtekvm`` command (see :mod:`mtekvm.cli`)."""

import sys

from mtekvm.cli import main

sys.exit(main())

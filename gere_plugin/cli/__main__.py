"""``python -m gere_plugin.cli``: the ``gere`` command."""

import sys

from . import main

sys.exit(main())

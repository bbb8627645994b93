"""``python -m allocator.cli``: the console script."""

import sys

from allocator.cli import main

sys.exit(main())

"""`python -m pymilterkit`: the same as the `pymilterkit` command."""

import sys

from ._cli import main

sys.exit(main())

"""``python -m pytei``: the command line (what ``torchrun -m pytei ...`` starts on every rank)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

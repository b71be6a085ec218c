"""`python -m orchestrator.soup_sweep`: the soup sweep (orchestrator/soup/sweep.py)."""

import sys

from orchestrator.soup.sweep import main

if __name__ == "__main__":
    sys.exit(main())

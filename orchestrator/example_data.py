"""`python -m orchestrator.example_data`: example data for the real-model configs
(orchestrator/soup/example_data.py)."""

import sys

from orchestrator.soup.example_data import main

if __name__ == "__main__":
    sys.exit(main())

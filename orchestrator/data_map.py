"""`python -m orchestrator.data_map`: a sweep's data map from the pool (orchestrator/dynamics/)."""

import sys

from orchestrator.soup.dynamics.cli import main

if __name__ == "__main__":
    sys.exit(main())

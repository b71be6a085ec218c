"""`python -m orchestrator.lr_sensitivity`: the small-proxy LR study (orchestrator/proxy/study.py)."""

import sys

from orchestrator.proxy.study import main

if __name__ == "__main__":
    sys.exit(main())

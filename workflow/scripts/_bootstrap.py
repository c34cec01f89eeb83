"""Put the repository root on ``sys.path`` so every job imports this checkout's ``z3lib``.

Snakemake's ``script:`` preamble puts only ``workflow/scripts/`` on ``sys.path``, and conda jobs
drop ``PYTHONPATH``; importing this module first makes ``import z3lib`` resolve to the code at the
run's commit, installed or not.
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

"""Put the repository root on ``sys.path`` so every job imports this checkout's ``z3lib``.

Snakemake's ``script:`` preamble puts only ``workflow/scripts/`` on ``sys.path``, and conda jobs
drop ``PYTHONPATH``; importing this module first makes ``import z3lib`` resolve to the code at the
run's commit, installed or not.
"""

import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def configure_logging(log_file: str, name: str) -> logging.Logger:
    """Send this job's log records (and warnings) to its Snakemake log file, timestamped."""
    logging.basicConfig(filename=log_file, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    return logging.getLogger(name)

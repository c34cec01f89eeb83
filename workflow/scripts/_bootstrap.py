"""Put the repository root on ``sys.path`` so every job imports this checkout's ``z3lib``.

Snakemake's ``script:`` preamble puts only ``workflow/scripts/`` on ``sys.path``, and conda jobs
drop ``PYTHONPATH``; importing this module first makes ``import z3lib`` resolve to the code at the
run's commit, installed or not. It also holds what every rule's script does around its one call
into z3lib: the log file set-up and :func:`stage` (failure traceback, version and wall time).
"""

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


def written_list(written: dict[str, Path]) -> str:
    """The files a stage wrote, sorted, for its log."""
    return ", ".join(sorted(str(p) for p in written.values()))


def log_files() -> list[str]:
    """The files the root logger writes to (this job's Snakemake log)."""
    return [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


@contextmanager
def stage(log: logging.Logger, label: str, version: str, threads: int | None = None) -> Iterator[None]:
    """Run a rule's work: a failure is logged with its traceback, success with the z3lib version,
    the thread count (when given) and the wall time.

    A user's mistake (:class:`z3lib.io.Z3InputError`: a file, column or key to fix) reaches the
    terminal as its one message and the log's path, and the job exits with status 1; the
    traceback stays in the log. Any other failure is a bug and is raised with its traceback.
    """
    from z3lib.io import Z3InputError

    start = time.perf_counter()
    try:
        yield
    except Z3InputError as error:
        log.exception("%s failed", label)
        where = ", ".join(log_files()) or "the job's log"
        sys.stderr.write(f"z3 {label}: {error}\n(the traceback is in {where})\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
    except Exception:
        log.exception("%s failed", label)
        raise
    used = f"{threads} threads, " if threads is not None else ""
    log.info("z3lib %s, %swall time %.1f s", version, used, time.perf_counter() - start)

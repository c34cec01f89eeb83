"""Put the repository root on ``sys.path`` so every job imports this checkout's ``z3lib``.

Snakemake's ``script:`` preamble puts only ``workflow/scripts/`` on ``sys.path``, and conda jobs
drop ``PYTHONPATH``; importing this module first makes ``import z3lib`` resolve to the code at the
run's commit, installed or not. It also holds what every rule's script does around its one call
into z3lib, in one place: :func:`job` (the log file, the thread count, the device, and
:func:`stage`: failure message or traceback, version, threads and wall time).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def configure_logging(log_file: str, name: str) -> logging.Logger:
    """Send this job's log records (and warnings) to its Snakemake log file, timestamped."""
    logging.basicConfig(filename=log_file, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    used = f"{threads} thread{'s' if threads != 1 else ''}, " if threads is not None else ""
    log.info("z3lib %s, %swall time %.1f s", version, used, time.perf_counter() - start)


@dataclass(frozen=True)
class Job:
    """What a rule's script hands to z3lib: its logger, the rule's params, its thread count,
    whether it holds a GPU slot (``resources.gpu``) and, when asked for, the torch device."""

    log: logging.Logger
    params: Any  # snakemake.params
    threads: int
    gpu_slot: bool
    device: torch.device | None = None


@contextmanager
def job(smk: Any, logger_name: str, label: str, *, torch_device: bool = False) -> Iterator[Job]:
    """Set up one Snakemake job and run its work under :func:`stage`.

    ``smk`` is the ``snakemake`` object of the script. The log records go to ``smk.log[0]``
    (logger ``logger_name``); torch gets ``smk.threads`` threads when the job uses torch
    (``torch_device``, or torch already imported by the script's z3lib imports: torch is never
    imported here otherwise); with ``torch_device`` the yielded :class:`Job` carries the device
    of :func:`z3lib.devices.select_device` (the GPU when the job holds a GPU slot and one is
    usable, else the CPU). ``label`` names the work in the terminal message of a user's mistake
    and in the log.
    """
    log = configure_logging(smk.log[0], logger_name)
    threads = int(smk.threads)
    if torch_device or "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
    gpu_slot = bool(smk.resources.get("gpu", 0))
    with stage(log, label, smk.params.z3lib, threads=threads):
        device = None
        if torch_device:
            from z3lib.devices import select_device

            device = select_device(gpu_slot, log)
        yield Job(log=log, params=smk.params, threads=threads, gpu_slot=gpu_slot, device=device)

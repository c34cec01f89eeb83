"""Adapter of rule ``refine``: gather the refined chunks in STAR order (z3lib.refine)."""

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import _bootstrap  # noqa: F401  (repository root on sys.path)

from z3lib.refine import gather_refined

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format=LOG_FORMAT)
logging.captureWarnings(True)
log = logging.getLogger("z3.refine")
params = snakemake.params
start = time.perf_counter()
try:
    written = gather_refined(
        list(snakemake.input.chunks),
        snakemake.input.original,
        Path(snakemake.output.particles).parent,
        degrees=(params.zernike["L1"], params.zernike["L2"]),
        basis=params.zernike["basis"],
        pixel_size=params.pixel_size,
        image_root=params.image_root,
        log=log,
    )
except Exception:
    log.exception("refine gather failed")
    raise
log.info("wrote %s", ", ".join(sorted(str(p) for p in written.values())))
elapsed = time.perf_counter() - start
log.info("z3lib %s, wall time %.1f s", params.z3lib, elapsed)

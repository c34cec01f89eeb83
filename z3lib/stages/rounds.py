"""Stages ``round_reference`` (and ``round_reference_half``) and ``publish``.

The next refinement round's reference, mask and point cloud from a corrected map, and the final
round's files copied to the stage paths.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from z3lib.geometry import points_from_volume
from z3lib.rounds import mask_for_round


def reference_from_map(
    volume: str | Path,
    template_points: str | Path,
    out_dir: str | Path,
    *,
    log: logging.Logger | None = None,
) -> dict[str, Path]:
    """Write the reference of the next round from a corrected map.

    ``reference.mrc`` (the map), ``mask.mrc`` (:func:`z3lib.rounds.mask_for_round`) and
    ``points.npz`` (the mask's voxels on the same sub-grid as ``template_points`` with the map's
    values as amplitudes, and its boxes and pixel sizes), written atomically to ``out_dir``.

    Parameters
    ----------
    volume
        a ZART map (``corrected.mrc`` or one half) at the processing box.
    template_points
        the preprocess stage's ``points.npz``: its box, pixel sizes and ``step`` are kept.
    out_dir
        Folder of the three files.
    log
        Logger for progress; default this module's.

    Returns
    -------
    name → path of every file written.
    """
    from z3lib.io import Z3InputError, read_map, read_npz, write_map, write_npz

    logger = log or logging.getLogger(__name__)
    template = read_npz(template_points)
    box, apix = int(template["box"]), float(template["pixel_size"])
    step = int(template["step"]) if "step" in template else 1
    vol = read_map(volume).data.astype(np.float32)
    if vol.shape != (box, box, box):
        raise Z3InputError(f"{volume} is {vol.shape[::-1]} voxels but the processing box is {box}")
    mask = mask_for_round(vol, apix)
    points, amplitudes = points_from_volume(vol, mask=mask, step=step)
    if len(points) == 0:
        raise Z3InputError(f"the mask derived from {volume} is empty: the map has no density above its threshold")
    out = Path(out_dir)
    paths = {"reference": out / "reference.mrc", "mask": out / "mask.mrc", "points": out / "points.npz"}
    write_map(paths["reference"], vol, apix)
    write_map(paths["mask"], mask, apix)
    write_npz(
        paths["points"],
        points=points.astype(np.float32),
        amplitudes=amplitudes.astype(np.float32),
        box=np.int64(box),
        pixel_size=np.float64(apix),
        original_box=np.int64(template["original_box"]),
        original_pixel_size=np.float64(template["original_pixel_size"]),
        step=np.int64(step),
    )
    logger.info("reference from %s: %d mask voxels (%d points, step %d)", volume, int(mask.sum()), len(points), step)
    return paths


def publish_files(pairs: Sequence[tuple[str | Path, str | Path]], *, log: logging.Logger | None = None) -> list[Path]:
    """Copy each ``(source, destination)`` (atomically, one file at a time).

    The final round's outputs go to the stage paths users and the report read.

    Copies, not hard links: Snakemake touches a job's outputs when it finishes, and a touched
    hard link would make the round's own files look newer than the files made from them.
    """
    from z3lib.io import copy_file

    logger = log or logging.getLogger(__name__)
    written = [copy_file(src, dst) for src, dst in pairs]
    logger.info("published %d files", len(written))
    return written

"""Flexible refinement rounds: the corrected map of one round becomes the reference of the next.

Round 1 starts from the preprocessed consensus reference, its mask and point cloud. Round k ≥ 2
fine-tunes round k−1's network and refines against round k−1's ZART-corrected map, with a mask
derived from that map and a new point cloud (voxels of the mask, amplitudes = the map's values),
exactly as preprocessing derives them from the consensus map. With independent gold-standard
halves, each half's reference comes from its own corrected half map, so that no information
crosses the halves. The stages (files in and out) are :mod:`z3lib.stages.rounds`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mask_for_round"]


def mask_for_round(volume: np.ndarray, pixel_size: float) -> np.ndarray:
    """Return a binary ``[z, y, x]`` mask (float32 0/1) of a corrected map.

    It is made as a user would make one from the map, the same way as the consensus mask:
    :func:`z3lib.consensus.mask_from_map`.

    Parameters
    ----------
    volume
        ``(N, N, N)`` map at the processing box.
    pixel_size
        Å per voxel.
    """
    from z3lib.consensus import mask_from_map

    return mask_from_map(volume, pixel_size)

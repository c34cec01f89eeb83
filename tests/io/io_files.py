"""Paths of the real files the z3lib.io tests read (tests/data, see its README), and their pixels
read independently of z3lib."""

from __future__ import annotations

import warnings
from pathlib import Path

import mrcfile
import numpy as np

DATA = Path(__file__).parents[1] / "data"
ASPIRE = DATA / "aspire"
DRGN = DATA / "cryodrgn"
EMDB = DATA / "mrcfile_emdb"
ADK = DATA / "mdanalysistests_adk"


def mrc_data(path: Path) -> np.ndarray:
    """Pixel data of an MRC file read directly with mrcfile (independent of z3lib)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # stacks without the "MAP " ID string
        with mrcfile.open(path, permissive=True) as mrc:
            return np.array(mrc.data, dtype=np.float32)

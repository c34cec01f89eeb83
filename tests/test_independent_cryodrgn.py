"""cryoSPARC ``.cs`` poses: z3's reader against cryoDRGN's parser on the same real file.

``tests/data/cryodrgn_csparc_poses/poses.npz`` holds what cryoDRGN 4.3.1's ``parse_pose_csparc``
made of ``tests/data/cryodrgn/cryosparc_P12_J24_001_particles.cs`` (a real cryoSPARC refinement,
2019 particles, box 180, 2.95 Å/px), and the RELION Euler angles and pixel shifts cryoDRGN's
``write_star`` converts them to; its README gives the command and cryoDRGN's conventions
(rotations are RELION's ``A`` itself; translations are pixels / box, RELION's sign). Nothing here
imports cryoDRGN, and nothing compares z3 with itself: the matrices are rebuilt from z3's Euler
angles with docs/conventions.md's row formula written out in tests/analytic.py, not with z3's
conversion code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from analytic import relion_matrix

from z3lib.io import read_particles

DATA = Path(__file__).parent / "data"
CS = DATA / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs"
FIXTURE = DATA / "cryodrgn_csparc_poses" / "poses.npz"
PIXEL_SIZE = 2.95  # Å, blob/psize_A of the .cs (tests/data/README.md)


def test_fixture_rotations_are_relion_matrices() -> None:
    """cryoDRGN's own pair (rotations, the RELION angles its write_star makes of them) obeys
    docs/conventions.md's ``A``: the convention the comparison below relies on (no transpose), checked on
    cryoDRGN's numbers alone."""
    fx = np.load(FIXTURE)
    e = fx["relion_euler_deg"]
    np.testing.assert_allclose(relion_matrix(e[:, 0], e[:, 1], e[:, 2]), fx["rotations"], atol=2e-6)
    assert not np.allclose(fx["rotations"], np.swapaxes(fx["rotations"], 1, 2), atol=1e-2)


def test_cs_poses_match_cryodrgn() -> None:
    """z3's RELION-convention poses from the ``.cs`` equal cryoDRGN's reading of the same file.

    Independent of z3's Euler/matrix code (the matrix is docs/conventions.md's formula, tests/analytic.py) and of z3's
    cryoSPARC conversion: the reference is cryoDRGN's ``expmap`` + transpose and its
    ``R_to_relion_scipy``. Rotations: ``A`` equals cryoDRGN's matrix (no transpose, see the
    fixture README); Euler angles equal cryoDRGN's mod 360° (all tilts 9–172°, so unique).
    Shifts: z3's px = cryoDRGN's fraction × box 180; ``rlnOriginX/YAngst`` = that × 2.95 Å.
    """
    fx = np.load(FIXTURE)
    parts = read_particles(CS)
    t = parts.table
    assert len(parts) == len(fx["rotations"]) == 2019 and int(fx["box"]) == parts.box == 180

    ours = t[["rot", "tilt", "psi"]].to_numpy()
    a = relion_matrix(ours[:, 0], ours[:, 1], ours[:, 2])
    np.testing.assert_allclose(a, fx["rotations"], atol=2e-6)  # float32 from cryoDRGN's torch
    diff = (ours - fx["relion_euler_deg"] + 180.0) % 360.0 - 180.0
    assert np.abs(diff).max() < 2e-4, np.abs(diff).max(axis=0)

    px = fx["translations"].astype(np.float64) * int(fx["box"])
    np.testing.assert_allclose(px, fx["relion_origin_px"], atol=1e-9)
    np.testing.assert_allclose(t[["shift_x", "shift_y"]].to_numpy(), px, atol=1e-5)
    angst = parts.raw[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    np.testing.assert_allclose(angst, px * PIXEL_SIZE, atol=1e-4)
    assert np.abs(px).max() > 5.0  # real, non-zero shifts of both signs
    assert (px < 0).any() and (px > 0).any()

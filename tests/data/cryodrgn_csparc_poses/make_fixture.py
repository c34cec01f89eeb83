"""Make the cryoDRGN pose fixture: cryoSPARC poses as cryoDRGN's own parser reads them.

Run once, by hand, in a throwaway environment that has cryoDRGN (never needed by the tests):

    python -m venv /tmp/cdrgn
    /tmp/cdrgn/bin/pip install --no-deps cryodrgn==4.3.1
    /tmp/cdrgn/bin/pip install igraph pyyaml        # imported by cryodrgn.utils
    # numpy, torch, scipy, pandas: any recent ones (here the project's, through a .pth file)
    /tmp/cdrgn/bin/python tests/data/cryodrgn_csparc_poses/make_fixture.py

(from the repository root). It runs cryoDRGN's ``parse_pose_csparc`` command — the code behind
``cryodrgn parse_pose_csparc particles.cs -o pose.pkl`` — on
``tests/data/cryodrgn/cryosparc_P12_J24_001_particles.cs``, reads back the pose pickle that
command has just written (a plain tuple of numpy arrays made here, not a file of unknown origin),
converts the rotations to RELION Euler angles and the translations to pixels exactly as
cryoDRGN's ``write_star`` does (``utils.R_to_relion_scipy(rot)``, ``trans * D``), and writes
``poses.npz`` next to this script. Nothing of z3 is imported.

cryoDRGN's conventions (cryoDRGN 4.3.1 source, the tool's reference for its pose format):

* ``rotations`` ``(N, 3, 3)``: ``parse_pose_csparc`` takes ``lie_tools.expmap`` (Rodrigues) of
  ``alignments3D/pose`` and transposes it. For RELION input, ``parse_pose_star`` stores
  ``utils.R_from_relion(euler)`` ("Produce a rotation matrix from Euler angles returned by
  RELION"), and ``write_star`` writes them back with ``R_to_relion_scipy``: cryoDRGN's matrix is
  RELION's projection matrix ``A`` itself (rows as in the project's design page), not its
  transpose. The script checks that ``R_from_relion`` of the Euler angles it writes gives the
  matrices back.
* ``translations`` ``(N, 2)``: pixels divided by the box ``D`` (``blob/shape``), "convert
  translations from pixels to fraction"; same sign as RELION's ``rlnOriginX/Y`` (``parse_pose_star``
  divides ``rlnOriginX`` by ``D`` without changing its sign; ``write_star`` writes
  ``trans * D`` to ``rlnOriginX``). Not scaled by 2 (``--hetrefine`` is for heterogeneous
  refinement jobs; this file is a homogeneous refinement, ``alignments3D/psize_A`` =
  ``blob/psize_A``).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
from pathlib import Path

import cryodrgn
import numpy as np
from cryodrgn import utils as drgn_utils
from cryodrgn.commands import parse_pose_csparc

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pkl = str(Path(tmp) / "pose.pkl")
        parser = argparse.ArgumentParser()
        parse_pose_csparc.add_args(parser)
        args = parser.parse_args([str(SOURCE), "-o", pkl])
        parse_pose_csparc.main(args)  # prints the first row of the .cs, writes pose.pkl
        with open(pkl, "rb") as fh:  # the pickle this process just wrote: two numpy arrays
            rot, trans = pickle.load(fh)
    rot = np.asarray(rot)
    trans = np.asarray(trans)
    box = int(np.load(SOURCE)["blob/shape"][0][0])
    euler = drgn_utils.R_to_relion_scipy(rot.astype(np.float64))  # as write_star does
    origin_px = trans.astype(np.float64) * box  # as write_star does ("fraction to pixels")
    back = drgn_utils.R_from_relion(euler.copy())
    err = float(np.abs(back - rot).max())
    if err > 1e-5:
        sys.exit(f"cryoDRGN's R_from_relion(R_to_relion_scipy(rot)) differs from rot by {err}")
    out = HERE / "poses.npz"
    np.savez_compressed(
        out,
        rotations=rot,
        translations=trans,
        box=np.int64(box),
        relion_euler_deg=euler,
        relion_origin_px=origin_px,
        cryodrgn_version=np.str_(cryodrgn.__version__),
    )
    print(f"wrote {out}: {len(rot)} poses, box {box}, cryoDRGN {cryodrgn.__version__}")


if __name__ == "__main__":
    main()

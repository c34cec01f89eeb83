"""cryoSPARC .cs particle metadata (z3lib.io.cryosparc), against the same particles as STAR and the raw arrays.

Expected values come from the data READMEs and from the files read independently (mrcfile,
starfile, numpy), never from z3lib.io itself (tests/data, see its README).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from io_files import DRGN, mrc_data

from z3lib import io
from z3lib.conventions import euler_to_matrix, rotvec_to_matrix


def test_empiar_star_and_cs_same_particles_and_pixels() -> None:
    star = io.read_particles(DRGN / "empiar_10076_7.star")
    cs = io.read_particles(DRGN / "empiar_10076_7.cs")
    assert star.block == "" and star.source_format == "relion3.0"
    assert cs.source_format == ".cs"
    for parts in (star, cs):
        assert len(parts) == 7
        assert parts.pixel_size == pytest.approx(1.31, abs=1e-5)
        assert not parts.has_poses
        assert np.isnan(parts.table["rot"]).all()
        assert (parts.table["shift_x"] == 0).all()
        assert parts.box == 320
    np.testing.assert_allclose(star.table["defocus_u"], cs.table["defocus_u"], rtol=1e-7)
    np.testing.assert_allclose(star.table["defocus_v"], cs.table["defocus_v"], rtol=1e-7)
    np.testing.assert_allclose(star.table["defocus_angle"], cs.table["defocus_angle"], atol=1e-5)
    assert (cs.table["image_sign"] == -1).all() and (star.table["image_sign"] == 1).all()
    a, b = star.images(), cs.images()
    got = a[:]
    assert got.shape == (7, 320, 320)
    np.testing.assert_array_equal(got, b[:])
    np.testing.assert_array_equal(got, mrc_data(DRGN / "empiar_10076_7.mrc"))


def test_cryosparc_refinement_cs() -> None:
    path = DRGN / "cryosparc_P12_J24_001_particles.cs"
    arr = np.load(path, allow_pickle=False)
    parts = io.read_particles(path)
    t = parts.table
    assert len(parts) == 2019
    assert parts.box == 180
    assert parts.pixel_size == pytest.approx(2.95)
    assert (t["voltage"] == 200).all()
    assert parts.has_poses
    np.testing.assert_allclose(t["defocus_angle"], np.rad2deg(arr["ctf/df_angle_rad"]), atol=1e-4)
    np.testing.assert_allclose(t["defocus_u"], arr["ctf/df1_A"], rtol=1e-6)
    np.testing.assert_array_equal(t["shift_x"], arr["alignments3D/shift"][:, 0])
    np.testing.assert_array_equal(t["shift_y"], arr["alignments3D/shift"][:, 1])
    back = euler_to_matrix(t["rot"].to_numpy(), t["tilt"].to_numpy(), t["psi"].to_numpy())
    expected = np.swapaxes(rotvec_to_matrix(arr["alignments3D/pose"]), -1, -2)
    np.testing.assert_allclose(back, expected, atol=1e-9)
    np.testing.assert_array_equal(t["random_subset"], arr["alignments3D/split"].astype(int) + 1)
    assert set(t["optics_group"]) == {1}  # exp_group_id 0 → optics group 1
    np.testing.assert_array_equal(t["image_index"], arr["blob/idx"])
    assert parts.raw["rlnImageName"].iloc[5] == (f"{int(arr['blob/idx'][5]) + 1:06d}@{arr['blob/path'][5].decode()}")
    np.testing.assert_allclose(parts.raw["rlnOriginXAngst"], arr["alignments3D/shift"][:, 0] * 2.95)
    assert parts.optics is not None
    assert parts.optics["rlnImageSize"].tolist() == [180]
    # metadata only: the J19 stacks are not there
    with pytest.raises(io.Z3InputError, match="image_root"):
        parts.images()[0]


def test_object_cs_is_refused(tmp_path: Path) -> None:
    arr = np.empty(2, dtype=[("blob/path", object), ("ctf/df1_A", "<f4")])
    with open(tmp_path / "obj.cs", "wb") as fh:
        np.save(fh, arr, allow_pickle=True)
    with pytest.raises(io.Z3InputError, match="never unpickles"):
        io.read_particles(tmp_path / "obj.cs")


def test_cs_without_ctf_fields(tmp_path: Path) -> None:
    arr = np.load(DRGN / "empiar_10076_7.cs", allow_pickle=False)
    keep = [n for n in arr.dtype.names if not n.startswith("ctf/")]
    with open(tmp_path / "noctf.cs", "wb") as fh:
        np.save(fh, arr[keep], allow_pickle=False)
    with pytest.raises(io.Z3InputError, match=r"ctf/df1_A.*passthrough"):
        io.read_particles(tmp_path / "noctf.cs")

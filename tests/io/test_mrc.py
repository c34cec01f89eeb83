"""MRC maps (z3lib.io.mrc): axis orders, starts, voxel sizes, invalid headers, writing.

Expected values come from the data READMEs and from the files read independently (mrcfile,
starfile, numpy), never from z3lib.io itself (tests/data, see its README).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from io_files import DATA, DRGN, EMDB, mrc_data

from z3lib import io


def test_emd3197_nonzero_start_in_origin() -> None:
    m = io.read_map(EMDB / "EMD-3197.map")
    assert m.data.shape == (20, 20, 20) and m.data.dtype == np.float32
    assert m.data.flags["C_CONTIGUOUS"]
    assert m.pixel_size == pytest.approx(11.4)
    assert m.origin == pytest.approx((-2 * 11.4, 0.0, 0.0))
    np.testing.assert_array_equal(m.data, mrc_data(EMDB / "EMD-3197.map"))


def test_emd3001_axis_order_and_anisotropic_voxels() -> None:
    m = io.read_map(EMDB / "EMD-3001.map")
    raw = mrc_data(EMDB / "EMD-3001.map")  # [section, row, column] = [y, x, z] (maps=2, mapr=1, mapc=3)
    assert raw.shape == (25, 43, 73)
    assert m.data.shape == (73, 25, 43)  # [z, y, x]
    for y, x, z in [(0, 0, 0), (3, 17, 50), (24, 42, 72), (10, 5, 1)]:
        assert m.data[z, y, x] == raw[y, x, z]
    assert m.voxel_size == pytest.approx((0.448, 0.3925, 0.459), abs=1e-3)
    # nystart −21 belongs to rows (x), nzstart −12 to sections (y)
    vx, vy, _ = m.voxel_size
    assert m.origin == pytest.approx((-21 * vx, -12 * vy, 0.0))
    with pytest.raises(ValueError, match="anisotropic"):
        _ = m.pixel_size
    with pytest.raises(io.Z3InputError, match="anisotropic"):
        io.read_map(EMDB / "EMD-3001.map", require_isotropic=True)


def test_emd6824_map() -> None:
    m = io.read_map(DATA / "diffmodeler_emd6824" / "emd_6824.mrc", require_isotropic=True)
    assert m.data.shape == (70, 70, 70)
    assert m.pixel_size == pytest.approx(2.64)
    assert m.origin == (0.0, 0.0, 0.0)
    assert float(m.data.min()) == pytest.approx(-3.20, abs=0.01)
    assert float(m.data.max()) == pytest.approx(9.42, abs=0.01)
    assert float(m.data.mean()) == pytest.approx(0.0, abs=1e-3)


def test_invalid_header_is_read_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="z3lib.io"):
        m = io.read_map(DRGN / "toy_projections.mrcs")  # no "MAP " ID string
    assert m.data.shape == (1000, 30, 30)
    assert "not valid" in caplog.text


def test_write_map_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    vol = rng.normal(size=(6, 7, 8)).astype(np.float64)
    io.write_map(tmp_path / "v.mrc", vol, 1.7, origin=(1.0, -2.0, 3.5))
    m = io.read_map(tmp_path / "v.mrc")
    np.testing.assert_array_equal(m.data, vol.astype(np.float32))
    assert m.pixel_size == pytest.approx(1.7)
    assert m.origin == pytest.approx((1.0, -2.0, 3.5))
    with mrcfile.open(tmp_path / "v.mrc") as mrc:  # strict: a valid MRC2014 file
        assert mrc.data.shape == (6, 7, 8)
    assert sorted(os.listdir(tmp_path)) == ["v.mrc"]

"""STAR writing (z3lib.io.relion): every input column kept, table values written back, .cs input.

Expected values come from the data READMEs and from the files read independently (mrcfile,
starfile, numpy), never from z3lib.io itself (tests/data, see its README).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from io_files import ASPIRE, DRGN

from z3lib import io


def test_write_particles_star_keeps_columns_and_adds_zernike(tmp_path: Path) -> None:
    parts = io.read_particles(DRGN / "relion31.star")
    coeffs = np.random.default_rng(4).normal(size=(5, 39))
    out = tmp_path / "with_z.star"
    zinfo = {"L1": 3, "L2": 2, "Rmax": 128.0, "basis": "xmipp", "box": 256}
    io.write_particles_star(out, parts, columns={io.ZERNIKE_COLUMN: coeffs}, zernike=zinfo)
    original = starfile.read(DRGN / "relion31.star", always_dict=True)
    back = starfile.read(out, always_dict=True)
    assert list(back) == ["optics", "particles", "zernike3d"]
    pd.testing.assert_frame_equal(back["optics"], original["optics"])
    cols = list(original["particles"].columns)
    assert list(back["particles"].columns) == cols + [io.ZERNIKE_COLUMN]
    pd.testing.assert_frame_equal(back["particles"][cols], original["particles"])
    parsed = io.parse_coefficient_column(back["particles"][io.ZERNIKE_COLUMN], n_expected=39)
    np.testing.assert_array_equal(parsed, coeffs)
    assert back["zernike3d"] == zinfo
    blocks = io.read_star_blocks(out)
    assert blocks["zernike3d"]["L1"].iloc[0] == 3
    assert "# version 30001" in out.read_text()
    # and z3 reads its own output with the same canonical values
    again = io.read_particles(out, image_root=DRGN)
    pd.testing.assert_frame_equal(again.table, parts.table)
    assert sorted(os.listdir(tmp_path)) == ["with_z.star"]


def test_coefficient_column_is_formatted_as_the_star_is_written(tmp_path: Path) -> None:
    """A 3,000-particle STAR with (7,7) coefficients (360 numbers a row, 25 MB of text) taken from a
    coefficient file: starfile reads back every value exactly and the columns in place, and the
    writer never holds more than a fraction of that text (the strings are made a few hundred rows
    at a time)."""
    import tracemalloc

    blocks = starfile.read(DRGN / "relion31.star", always_dict=True)
    n = 3000
    rows = blocks["particles"].iloc[np.arange(n) % len(blocks["particles"])].reset_index(drop=True)
    starfile.write({"optics": blocks["optics"], "particles": rows}, tmp_path / "many.star")
    parts = io.read_particles(tmp_path / "many.star", image_root=DRGN)
    coeffs = np.random.default_rng(14).normal(size=(n, 360)) * 1e-3
    io.write_coefficients(tmp_path / "c.npy", coeffs)
    cost = np.linspace(0, 1, n)
    out = tmp_path / "out.star"
    tracemalloc.start()
    io.write_particles_star(
        out, parts, columns={io.ZERNIKE_COLUMN: io.CoefficientFile(tmp_path / "c.npy"), "zernikeCost": cost}
    )
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    text = out.stat().st_size
    assert text > 20e6 and peak < 0.25 * text, (peak, text)
    back = starfile.read(out, always_dict=True)["particles"]
    assert list(back.columns) == list(rows.columns) + [io.ZERNIKE_COLUMN, "zernikeCost"]
    np.testing.assert_array_equal(io.parse_coefficient_column(back[io.ZERNIKE_COLUMN], n_expected=360), coeffs)
    np.testing.assert_array_equal(back["zernikeCost"].to_numpy(), cost)
    pd.testing.assert_frame_equal(back[list(rows.columns)], rows)


def test_write_particles_star_relion30_and_table_write_back(tmp_path: Path) -> None:
    parts = io.read_particles(ASPIRE / "sample_relion_data.star")
    table = parts.table.iloc[[4, 1, 7]].copy()
    table["rot"] = [10.0, 20.0, 30.0]
    table["shift_x"] = [1.5, -2.0, 0.25]
    out = tmp_path / "subset.star"
    io.write_particles_star(out, parts, table=table)
    back = starfile.read(out, always_dict=True)
    assert list(back) == ["model_class_1"]
    frame = back["model_class_1"]
    original = starfile.read(ASPIRE / "sample_relion_data.star")
    assert list(frame.columns) == list(original.columns)
    assert frame["rlnImageName"].tolist() == original["rlnImageName"].iloc[[4, 1, 7]].tolist()
    assert frame["rlnAngleRot"].tolist() == [10.0, 20.0, 30.0]
    assert frame["rlnOriginX"].tolist() == [1.5, -2.0, 0.25]  # RELION 3.0: pixels
    np.testing.assert_array_equal(frame["rlnOriginY"], original["rlnOriginY"].iloc[[4, 1, 7]])
    bad = parts.table.copy()
    bad["voltage"] = 200.0
    with pytest.raises(io.Z3InputError, match="voltage"):
        io.write_particles_star(tmp_path / "bad.star", parts, table=bad)
    with pytest.raises(io.Z3InputError, match="17 particles"):
        io.write_particles_star(tmp_path / "bad.star", parts, columns={"x": [1, 2]})
    assert not (tmp_path / "bad.star").exists()


def test_write_back_shift_angstrom_for_relion31(tmp_path: Path) -> None:
    parts = io.read_particles(DRGN / "relion31.star")
    table = parts.table.copy()
    table["shift_x"] = [1.0, 2.0, 3.0, 4.0, 5.0]
    io.write_particles_star(tmp_path / "s.star", parts, table=table)
    back = starfile.read(tmp_path / "s.star")["particles"]
    np.testing.assert_allclose(back["rlnOriginXAngst"], np.arange(1, 6) * 2.806)
    again = io.read_particles(tmp_path / "s.star")
    np.testing.assert_allclose(again.table["shift_x"], np.arange(1, 6), rtol=1e-12)


def test_write_particles_star_from_cs(tmp_path: Path) -> None:
    parts = io.read_particles(DRGN / "cryosparc_P12_J24_001_particles.cs")
    out = tmp_path / "from_cs.star"
    io.write_particles_star(out, parts, zernike={"L1": 3, "L2": 2, "Rmax": 90, "basis": "xmipp", "box": 180})
    back = starfile.read(out, always_dict=True)
    optics = back["optics"]
    for col in (
        "rlnOpticsGroup",
        "rlnImagePixelSize",
        "rlnImageSize",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
    ):
        assert col in optics.columns
    assert optics["rlnImagePixelSize"].tolist() == [2.95]
    assert optics["rlnVoltage"].tolist() == [200.0]
    again = io.read_particles(out)
    assert again.source_format == "relion3.1"
    cols = [
        "rot",
        "tilt",
        "psi",
        "shift_x",
        "shift_y",
        "defocus_u",
        "defocus_v",
        "defocus_angle",
        "voltage",
        "cs",
        "amplitude_contrast",
        "pixel_size",
        "box",
        "optics_group",
        "random_subset",
        "image_index",
    ]
    pd.testing.assert_frame_equal(again.table[cols], parts.table[cols], rtol=1e-12)

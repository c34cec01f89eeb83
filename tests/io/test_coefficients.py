"""Coefficient files (z3lib.io.coefficients): .npy, the zernikeCoefficients column, z_clnm text files.

Expected values come from the data READMEs and from the files read independently (mrcfile,
starfile, numpy), never from z3lib.io itself (tests/data, see its README).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from z3lib import io


def test_coefficient_column_round_trip() -> None:
    rng = np.random.default_rng(5)
    c64 = rng.normal(size=(4, 39)) * 10.0 ** rng.integers(-6, 3, size=(4, 39))
    np.testing.assert_array_equal(io.parse_coefficient_column(io.format_coefficient_column(c64), n_expected=39), c64)
    c32 = c64.astype(np.float32)
    back = io.parse_coefficient_column(io.format_coefficient_column(c32), n_expected=39)
    np.testing.assert_array_equal(back.astype(np.float32), c32)
    text = io.format_coefficient_column(c64[:1])[0]
    assert " " not in text and text.count(",") == 38
    xmipp = ["'" + " ".join(map(repr, row)) + "'" for row in c64.tolist()]
    np.testing.assert_array_equal(io.parse_coefficient_column(xmipp, n_expected=39), c64)
    with pytest.raises(io.Z3InputError, match="row 1 has 38"):
        io.parse_coefficient_column([text, ",".join(text.split(",")[:38])], n_expected=39)


def test_coefficients_npy_round_trip(tmp_path: Path) -> None:
    for dtype in (np.float32, np.float64):
        c = np.random.default_rng(6).normal(size=(7, 39)).astype(dtype)
        io.write_coefficients(tmp_path / "c.npy", c)
        back = io.read_coefficients(tmp_path / "c.npy")
        assert back.dtype == dtype
        np.testing.assert_array_equal(back, c)
    np.save(tmp_path / "one_d.npy", np.zeros(39))
    with pytest.raises(io.Z3InputError, match="2-D"):
        io.read_coefficients(tmp_path / "one_d.npy")
    assert sorted(os.listdir(tmp_path)) == ["c.npy", "one_d.npy"]


@pytest.mark.parametrize(
    ("l1", "l2", "k"), [(1, 1, 4), (2, 2, 10), (3, 2, 13), (3, 3, 20), (5, 5, 56), (7, 7, 120), (8, 8, 165)]
)
def test_term_counts_match_reference_table(l1: int, l2: int, k: int) -> None:
    assert io._count_terms(l1, l2) == k


def test_zernike_file_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = np.random.default_rng(7).normal(size=(3, 39))
    io.write_zernike_file(tmp_path / "z_clnm.txt", c, 3, 2, 32.0)
    lines = (tmp_path / "z_clnm.txt").read_text().splitlines()
    assert lines[0].split() == ["3", "2", "32.0"] and len(lines) == 4
    coeffs, l1, l2, rmax = io.read_zernike_file(tmp_path / "z_clnm.txt")
    assert (l1, l2, rmax) == (3, 2, 32.0)
    np.testing.assert_array_equal(coeffs, c)
    io.write_zernike_file(tmp_path / "one.txt", c[0], 3, 2, 32.0)
    assert io.read_zernike_file(tmp_path / "one.txt")[0].shape == (1, 39)
    with pytest.raises(io.Z3InputError, match="3K = 60"):
        io.write_zernike_file(tmp_path / "bad.txt", c, 3, 3, 32.0)
    old = "3 2 32\n" + " ".join(map(str, list(c[0]) + [0.0] * 8)) + "\n"
    (tmp_path / "old.txt").write_text(old)
    with caplog.at_level(logging.WARNING, logger="z3lib.io"):
        coeffs, *_ = io.read_zernike_file(tmp_path / "old.txt")
    np.testing.assert_allclose(coeffs[0], c[0])
    assert "trailing 8" in caplog.text
    (tmp_path / "wrong.txt").write_text("3 2 32\n1 2 3\n")
    with pytest.raises(io.Z3InputError, match="line 2 has 3 numbers"):
        io.read_zernike_file(tmp_path / "wrong.txt")


def test_coefficient_writer_rows_in_any_order_and_partial_reads(tmp_path: Path) -> None:
    """Rows written a block at a time, in any order (a slice, scattered rows, consecutive rows),
    read back by numpy's own np.load; a failed write leaves no file; row reads take only those rows."""
    c = np.random.default_rng(8).normal(size=(50, 39))
    path = tmp_path / "c.npy"
    with io.open_coefficient_writer(path, 50, 39) as writer:
        writer[40:50] = c[40:50]
        scattered = np.array([0, 7, 3, 39, 21])
        writer[scattered] = c[scattered]
        rest = np.setdiff1d(np.arange(40), scattered)
        for lo in range(0, len(rest), 6):
            writer[rest[lo : lo + 6]] = c[rest[lo : lo + 6]]
        with pytest.raises(ValueError, match="values for"):
            writer[0:3] = c[:2]
    np.testing.assert_array_equal(np.load(path), c)
    assert io.coefficient_file_shape(path) == (50, 39)
    np.testing.assert_array_equal(io.read_coefficients(path, slice(10, 20)), c[10:20])
    np.testing.assert_array_equal(io.read_coefficients(path, [49, 0, 5]), c[[49, 0, 5]])
    lazy = io.CoefficientFile(path)
    assert lazy.shape == (50, 39) and len(lazy) == 50
    np.testing.assert_array_equal(lazy[45:], c[45:])
    with pytest.raises(io.Z3InputError, match="rows out of range"):
        io.read_coefficients(path, [50])
    with pytest.raises(RuntimeError, match="stop"), io.open_coefficient_writer(tmp_path / "d.npy", 5, 39) as w:
        w[0:5] = c[:5]
        raise RuntimeError("stop")
    assert sorted(os.listdir(tmp_path)) == ["c.npy"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_reads_match_numpy_indexing_for_any_rows(tmp_path: Path, dtype: type) -> None:
    """Row reads (positioned reads of each run of consecutive rows, nothing mapped) give what
    numpy's own indexing of the whole array gives: scattered, unsorted, repeated and negative
    rows, runs, strided and empty slices, in the stored precision."""
    c = np.random.default_rng(3).normal(size=(300, 21)).astype(dtype)
    path = tmp_path / "c.npy"
    np.save(path, c)
    rng = np.random.default_rng(4)
    cases: list[object] = [
        rng.permutation(300)[:77],
        [5, 5, 6, 7, 299, 0, 1, 2, 6],
        [-1, -300, 10],
        np.arange(40, 90),
        slice(None, None, 7),
        slice(250, None),
        slice(10, 10),
        np.array([], dtype=np.int64),
    ]
    for rows in cases:
        got = io.read_coefficients(path, rows)  # type: ignore[arg-type]
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, c[rows])  # type: ignore[index]
    with pytest.raises(io.Z3InputError, match="rows out of range"):
        io.read_coefficients(path, [-301])

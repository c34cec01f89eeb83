"""What every reader and writer shares (z3lib.io._common): atomic writes, missing files, refused pickles.

Expected values come from the data READMEs and from the files read independently (mrcfile,
starfile, numpy), never from z3lib.io itself (tests/data, see its README).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from z3lib import io


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.star"
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("writer failed")
    assert os.listdir(tmp_path) == []
    target.write_text("previous version")
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("writer failed")
    assert target.read_text() == "previous version"
    assert os.listdir(tmp_path) == ["out.star"]
    with pytest.raises(io.Z3InputError):
        io.write_map(tmp_path / "bad.mrc", np.zeros((4, 4)), 1.0)
    assert os.listdir(tmp_path) == ["out.star"]


def test_pickles_are_refused(tmp_path: Path) -> None:
    payload = {"rot": np.zeros((2, 3, 3))}
    for name in ("poses.pkl", "particles.star", "particles.cs"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(payload, protocol=4))
        with pytest.raises(io.Z3InputError, match="never unpickles"):
            io.read_particles(path)
    np.save(tmp_path / "coeffs.npy", np.array([object(), 1], dtype=object), allow_pickle=True)
    with pytest.raises(io.Z3InputError, match="never unpickles"):
        io.read_coefficients(tmp_path / "coeffs.npy")


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(io.Z3InputError, match="does not exist"):
        io.read_particles(tmp_path / "nothere.star")
    (tmp_path / "garbage.star").write_bytes(b"\x00\x01\x02 not a star file \xff")
    with pytest.raises(ValueError, match="garbage.star"):
        io.read_particles(tmp_path / "garbage.star")
    with pytest.raises(io.Z3InputError, match="does not exist"):
        io.read_map(tmp_path / "nothere.mrc")
    with pytest.raises(io.Z3InputError, match="does not exist"):
        io.read_model(tmp_path / "nothere.pdb")
    (tmp_path / "empty.pdb").write_text("")
    with pytest.raises(io.Z3InputError, match="empty"):
        io.read_model(tmp_path / "empty.pdb")
    (tmp_path / "noatoms.pdb").write_text("REMARK nothing\nEND\n")
    with pytest.raises(io.Z3InputError, match="no atoms"):
        io.read_model(tmp_path / "noatoms.pdb")

"""Atomic models (z3lib.io.models): PDB without element columns, and the PDB round trip.

Expected values come from the data READMEs and from the files read independently (mrcfile,
starfile, numpy), never from z3lib.io itself (tests/data, see its README).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from io_files import ADK

from z3lib import io


def test_adk_models_and_pdb_round_trip(tmp_path: Path) -> None:
    open_ = io.read_model(ADK / "adk_open.pdb")
    closed = io.read_model(ADK / "adk_closed.pdb")
    assert len(open_) == 3341 and open_.coords.shape == (3341, 3)
    np.testing.assert_array_equal(open_.atom_names, closed.atom_names)
    np.testing.assert_array_equal(open_.residue_names, closed.residue_names)
    np.testing.assert_array_equal(open_.residue_numbers, closed.residue_numbers)
    assert open_.coords[0] == pytest.approx([-11.921, 26.307, 10.410])  # first ATOM line
    assert open_.residue_numbers.max() == 214
    assert set(open_.segment_ids) == {"4AKE"}
    # no element columns: CA is carbon, HG1 hydrogen (not calcium, mercury)
    assert set(open_.elements[open_.atom_names == "CA"]) == {"C"}
    assert set(open_.elements) <= {"C", "N", "O", "S", "H"}
    assert (open_.elements == "H").sum() > 1000
    assert np.abs(open_.coords - closed.coords).max() > 5.0
    out = tmp_path / "moved.pdb"
    io.write_model_pdb(out, open_, closed.coords)
    again = io.read_model(out)
    np.testing.assert_allclose(again.coords, closed.coords, atol=1e-3)
    np.testing.assert_array_equal(again.atom_names, open_.atom_names)
    np.testing.assert_array_equal(again.elements, open_.elements)
    np.testing.assert_allclose(again.bfactors, open_.bfactors, atol=0.01)
    with pytest.raises(io.Z3InputError, match="shape"):
        io.write_model_pdb(tmp_path / "bad.pdb", open_, closed.coords[:10])
    assert sorted(os.listdir(tmp_path)) == ["moved.pdb"]

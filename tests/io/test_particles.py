"""RELION STAR particle metadata (z3lib.io.particles): reading, and the messages for bad input.

Expected values come from the data READMEs and from the files read independently (mrcfile,
starfile, numpy), never from z3lib.io itself (tests/data, see its README).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from io_files import ASPIRE, DRGN

from z3lib import io


def _relion31_blocks() -> dict[str, pd.DataFrame]:
    return dict(starfile.read(DRGN / "relion31.star", always_dict=True))


def test_relion31_pixel_size_from_optics_not_header() -> None:
    parts = io.read_particles(DRGN / "relion31.star")
    raw = starfile.read(DRGN / "relion31.star")["particles"]
    assert len(parts) == 5
    assert parts.source_format == "relion3.1"
    assert parts.relion_version == "30001"
    # README: the header says 1.0 Å (wrong), the optics table 2.806 Å
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with mrcfile.open(DRGN / "relion31.mrcs", permissive=True, header_only=True) as mrc:
            assert float(mrc.voxel_size.x) == pytest.approx(1.0)
    assert parts.pixel_size == pytest.approx(2.806)
    np.testing.assert_allclose(parts.table["shift_x"], raw["rlnOriginXAngst"] / 2.806, rtol=1e-12)
    np.testing.assert_allclose(parts.table["shift_y"], raw["rlnOriginYAngst"] / 2.806, rtol=1e-12)
    np.testing.assert_allclose(parts.table["rot"], raw["rlnAngleRot"])
    np.testing.assert_allclose(parts.table["tilt"], raw["rlnAngleTilt"])
    np.testing.assert_allclose(parts.table["psi"], raw["rlnAnglePsi"])
    t = parts.table
    assert (t["voltage"] == 300).all() and (t["cs"] == 0.01).all()
    assert (t["amplitude_contrast"] == 0.1).all()
    assert parts.box == 256
    assert parts.has_poses
    assert t["image_index"].tolist() == [0, 1, 2, 3, 4]
    assert t["defocus_u"].iloc[0] == pytest.approx(13108.082418)
    assert t["defocus_angle"].iloc[0] == pytest.approx(-160.39)
    # every input column kept, in order
    assert list(parts.raw.columns) == list(raw.columns)


def test_aspire_relion30_block_name_pixel_size_and_pixel_shifts() -> None:
    parts = io.read_particles(ASPIRE / "sample_relion_data.star")
    raw = starfile.read(ASPIRE / "sample_relion_data.star")
    assert parts.block == "model_class_1"
    assert parts.source_format == "relion3.0"
    assert parts.optics is None
    assert len(parts) == 17
    # 5 µm detector pixel × 1e4 / magnification 37369.207031
    assert parts.pixel_size == pytest.approx(5.0 * 1e4 / 37369.207031, rel=1e-12)
    assert parts.pixel_size == pytest.approx(1.338, abs=1e-3)
    # RELION 3.0 shifts are already pixels: unchanged
    np.testing.assert_array_equal(parts.table["shift_x"], raw["rlnOriginX"])
    np.testing.assert_array_equal(parts.table["shift_y"], raw["rlnOriginY"])
    # no rlnImageSize: the box comes from the stack header
    assert parts.box == 200
    assert parts.table["random_subset"].tolist() == raw["rlnRandomSubset"].tolist()


def test_aspire_relion31_two_optics_groups_joined() -> None:
    parts = io.read_particles(ASPIRE / "sample_particles_relion31.star")
    raw = starfile.read(ASPIRE / "sample_particles_relion31.star")["particles"]
    t = parts.table
    assert len(parts) == 17
    assert sorted(set(t["optics_group"])) == [1, 2]
    group = raw["rlnOpticsGroup"].to_numpy()
    assert (t["voltage"].to_numpy()[group == 2] == 200).all()
    assert (t["voltage"].to_numpy()[group == 1] == 300).all()
    # this file's optics block says 1.4 Å for both groups (not the 1.338 of the 3.0 file)
    assert parts.pixel_size == pytest.approx(1.4)
    np.testing.assert_allclose(t["shift_x"], raw["rlnOriginXAngst"] / 1.4, rtol=1e-12)
    assert parts.box == 200  # from the stack header (no rlnImageSize)


def test_relion31_six_optics_groups_metadata_only() -> None:
    parts = io.read_particles(DRGN / "relion31.6opticsgroups.star")
    optics = starfile.read(DRGN / "relion31.6opticsgroups.star")["optics"]
    t = parts.table
    assert len(parts) == 139
    assert parts.optics is not None and len(parts.optics) == 6
    assert set(t["optics_group"]) <= set(range(1, 7))
    per_group = dict(zip(optics["rlnOpticsGroup"], optics["rlnImagePixelSize"], strict=True))
    np.testing.assert_allclose(t["pixel_size"], t["optics_group"].map(per_group))
    cs_group = dict(zip(optics["rlnOpticsGroup"], optics["rlnSphericalAberration"], strict=True))
    np.testing.assert_allclose(t["cs"], t["optics_group"].map(cs_group))
    assert (t["box"] == 196).all() and parts.box == 196
    assert not t["ctf_premultiplied"].any()
    # 1.24 and 1.25 Å in different groups: no single pixel size
    with pytest.raises(ValueError, match=r"group 2: 1\.24"):
        _ = parts.pixel_size
    # the stacks are not shipped: reading is fine, image access says where it looked
    with pytest.raises(io.Z3InputError) as err:
        parts.images().validate()
    msg = str(err.value)
    assert "does not exist" in msg and "image_root" in msg and "0003_shiny.mrcs" in msg


def test_relion5_star() -> None:
    parts = io.read_particles(DRGN / "relion5.star")
    assert len(parts) == 17
    assert parts.source_format == "relion3.1"
    assert parts.relion_version == "50001"
    assert parts.pixel_size == pytest.approx(0.89)
    assert parts.box == 448
    assert (parts.table["voltage"] == 100).all()
    assert (parts.table["cs"] == 1.6).all()
    assert parts.has_poses


def test_missing_defocus_column_is_named(tmp_path: Path) -> None:
    blocks = _relion31_blocks()
    blocks["particles"] = blocks["particles"].drop(columns=["rlnDefocusU"])
    bad = tmp_path / "nodefocus.star"
    starfile.write(blocks, bad)
    with pytest.raises(io.Z3InputError) as err:
        io.read_particles(bad)
    msg = str(err.value)
    assert "rlnDefocusU" in msg and "nodefocus.star" in msg and "data_particles" in msg


def test_missing_pose_column_named_exactly(tmp_path: Path) -> None:
    """A STAR missing only rlnAngleTilt: the message names that column as missing, the other two
    as present, the file and the fix (it used to say "no particle poses (rlnAngleRot/Tilt/Psi…)")."""
    blocks = _relion31_blocks()
    blocks["particles"] = blocks["particles"].drop(columns=["rlnAngleTilt"])
    bad = tmp_path / "notilt.star"
    starfile.write(blocks, bad)
    parts = io.read_particles(bad)  # metadata without poses is readable; poses are required later
    with pytest.raises(io.Z3InputError) as err:
        parts.require_poses("z3 starts from a consensus refinement")
    msg = str(err.value)
    assert str(bad) in msg and "data_particles" in msg
    assert "lacks the pose column(s) rlnAngleTilt (present: rlnAngleRot, rlnAnglePsi)" in msg
    assert "run_data.star" in msg and "z3 starts from a consensus refinement" in msg
    # every pose column absent: all three named, none present
    starfile.write(
        dict(blocks, particles=blocks["particles"].drop(columns=["rlnAngleRot", "rlnAnglePsi"])),
        tmp_path / "nopose.star",
    )
    with pytest.raises(io.Z3InputError, match=r"rlnAngleRot, rlnAngleTilt, rlnAnglePsi \(present: none\)"):
        io.read_particles(tmp_path / "nopose.star").require_poses("poses")
    # the column is there but one value is not a number: the column and the row are named
    blocks = _relion31_blocks()
    blocks["particles"]["rlnAngleTilt"] = blocks["particles"]["rlnAngleTilt"].astype(object)
    blocks["particles"].loc[3, "rlnAngleTilt"] = "nan"
    starfile.write(blocks, tmp_path / "nantilt.star")
    with pytest.raises(io.Z3InputError, match=r"nantilt.star: pose column rlnAngleTilt .* \(first: row 3\)"):
        io.read_particles(tmp_path / "nantilt.star").require_poses("poses")
    io.read_particles(DRGN / "relion31.star").require_poses("poses")  # complete poses: no error


def test_missing_ctf_column_names_missing_and_present(tmp_path: Path) -> None:
    blocks = _relion31_blocks()
    blocks["particles"] = blocks["particles"].drop(columns=["rlnDefocusV"])
    starfile.write(blocks, tmp_path / "nodefv.star")
    with pytest.raises(io.Z3InputError) as err:
        io.read_particles(tmp_path / "nodefv.star")
    msg = str(err.value)
    assert (
        "nodefv.star: missing CTF column(s) rlnDefocusV (present: rlnDefocusU, rlnDefocusAngle, "
        "rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast)" in msg
    )
    assert "CTF-refined job" in msg


def test_half_an_origin_shift_pair_is_refused(tmp_path: Path) -> None:
    """rlnOriginXAngst without rlnOriginYAngst used to read as zero shifts, silently."""
    blocks = _relion31_blocks()
    blocks["particles"] = blocks["particles"].drop(columns=["rlnOriginYAngst"])
    starfile.write(blocks, tmp_path / "halfshift.star")
    with pytest.raises(
        io.Z3InputError,
        match=r"halfshift.star: .* has the origin shift column rlnOriginXAngst "
        r"but not rlnOriginYAngst.*Fix: add rlnOriginYAngst",
    ):
        io.read_particles(tmp_path / "halfshift.star")


def test_missing_optics_ctf_column_points_to_optics_block(tmp_path: Path) -> None:
    blocks = _relion31_blocks()
    blocks["optics"] = blocks["optics"].drop(columns=["rlnVoltage"])
    bad = tmp_path / "novoltage.star"
    starfile.write(blocks, bad)
    with pytest.raises(ValueError, match=r"rlnVoltage.*optics"):
        io.read_particles(bad)


def test_missing_image_name_and_empty_block(tmp_path: Path) -> None:
    blocks = _relion31_blocks()
    noname = dict(blocks, particles=blocks["particles"].drop(columns=["rlnImageName"]))
    starfile.write(noname, tmp_path / "noname.star")
    with pytest.raises(
        io.Z3InputError,
        match=r"noname.star: .*no rlnImageName column.*Columns found: "
        r"rlnCoordinateX.*Fix: give the particles STAR",
    ):
        io.read_particles(tmp_path / "noname.star")
    empty = dict(blocks, particles=blocks["particles"].iloc[:0])
    starfile.write(empty, tmp_path / "empty.star")
    with pytest.raises(io.Z3InputError, match="empty"):
        io.read_particles(tmp_path / "empty.star")


def test_unknown_optics_group(tmp_path: Path) -> None:
    blocks = _relion31_blocks()
    particles = blocks["particles"].copy()
    particles.loc[2, "rlnOpticsGroup"] = 7
    starfile.write(dict(blocks, particles=particles), tmp_path / "group7.star")
    with pytest.raises(io.Z3InputError, match=r"row 2.*\[7\]"):
        io.read_particles(tmp_path / "group7.star")

"""Tests of z3lib.io against real files (tests/data, see its README) and small synthetic cases.

Expected values come from the data READMEs and from the files read independently (mrcfile,
starfile, numpy), never from z3lib.io itself.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from z3lib import io
from z3lib.conventions import euler_to_matrix, rotvec_to_matrix

DATA = Path(__file__).parent / "data"
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


# ==============================================================================================
# RELION STAR files
# ==============================================================================================
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


def test_relion31_images_equal_mrcfile_data() -> None:
    parts = io.read_particles(DRGN / "relion31.star")
    images = parts.images()
    assert len(images) == 5 and images.box == 256
    expected = mrc_data(DRGN / "relion31.mrcs")
    got = images[:]
    assert got.dtype == np.float32 and got.shape == (5, 256, 256)
    np.testing.assert_array_equal(got, expected)
    one = images[3]
    assert one.shape == (256, 256)
    np.testing.assert_array_equal(one, expected[3])
    np.testing.assert_array_equal(images[-1], expected[4])
    images.validate()
    images.close()


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


def test_aspire_images_through_star_equal_mrcfile() -> None:
    parts = io.read_particles(ASPIRE / "sample_relion_data.star")
    expected = mrc_data(ASPIRE / "sample.mrcs")
    images = parts.images()
    np.testing.assert_array_equal(images[np.arange(17)], expected)
    order = np.array([16, 3, 3, 0, 9, 5])
    np.testing.assert_array_equal(images[order], expected[order])


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
    per_group = dict(zip(optics["rlnOpticsGroup"], optics["rlnImagePixelSize"]))
    np.testing.assert_allclose(t["pixel_size"], t["optics_group"].map(per_group))
    cs_group = dict(zip(optics["rlnOpticsGroup"], optics["rlnSphericalAberration"]))
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
    assert parts.raw["rlnImageName"].iloc[5] == (
        f"{int(arr['blob/idx'][5]) + 1:06d}@{arr['blob/path'][5].decode()}"
    )
    np.testing.assert_allclose(parts.raw["rlnOriginXAngst"], arr["alignments3D/shift"][:, 0] * 2.95)
    assert parts.optics is not None
    assert parts.optics["rlnImageSize"].tolist() == [180]
    # metadata only: the J19 stacks are not there
    with pytest.raises(io.Z3InputError, match="image_root"):
        parts.images()[0]


def test_toy_stack_needs_pixel_size_and_reads_indices() -> None:
    star = DRGN / "toy_projections_poses.star"
    with pytest.raises(ValueError) as err:
        io.read_particles(star)
    assert "pixel_size=" in str(err.value) and "toy_projections_poses.star" in str(err.value)
    assert "rlnImagePixelSize" in str(err.value)
    parts = io.read_particles(star, pixel_size=1.0)
    assert len(parts) == 1000 and parts.pixel_size == 1.0 and parts.box == 30
    assert parts.table["image_index"].tolist() == list(range(1000))
    poses = np.load(DRGN / "toy_rot_zerotrans.npz")
    t = parts.table
    mats = euler_to_matrix(t["rot"].to_numpy(), t["tilt"].to_numpy(), t["psi"].to_numpy())
    np.testing.assert_allclose(mats, poses["rotations"], atol=1e-5)
    np.testing.assert_array_equal(t[["shift_x", "shift_y"]].to_numpy(), poses["translations"])
    expected = mrc_data(DRGN / "toy_projections.mrcs")
    images = parts.images()
    rng = np.random.default_rng(0)
    rows = rng.permutation(1000)[:64]
    batch = images[rows]
    for k, r in enumerate(rows):
        np.testing.assert_array_equal(batch[k], images[int(r)])
        np.testing.assert_array_equal(batch[k], expected[r])
    np.testing.assert_array_equal(images[10:20:3], expected[10:20:3])
    mask = np.zeros(1000, dtype=bool)
    mask[[5, 7]] = True
    np.testing.assert_array_equal(images[mask], expected[[5, 7]])
    assert images[np.array([], dtype=int)].shape == (0, 30, 30)
    # a stack pickles without its open files (data-loader workers)
    clone = pickle.loads(pickle.dumps(images))
    np.testing.assert_array_equal(clone[rows[:3]], expected[rows[:3]])


def test_image_stack_from_paths_and_lru_cache(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    stacks = [rng.normal(size=(3, 8, 8)).astype(np.float32) for _ in range(4)]
    paths = []
    for i, s in enumerate(stacks):
        paths.append(tmp_path / f"s{i}.mrcs")
        io.write_stack(paths[-1], s, 1.5)
    files = [paths[i % 4] for i in range(12)]
    idx = [i // 4 for i in range(12)]
    images = io.ImageStack(files, idx, cache_size=2)
    assert len(images) == 12 and images.box == 8
    got = images[np.arange(12)[::-1]]
    for k, r in enumerate(range(11, -1, -1)):
        np.testing.assert_array_equal(got[k], stacks[r % 4][r // 4])
    assert len(images._handles) <= 2
    images.validate()


def test_single_image_mrc_file(tmp_path: Path) -> None:
    img = np.arange(36, dtype=np.float32).reshape(6, 6)
    with mrcfile.new(tmp_path / "one.mrc") as mrc:
        mrc.set_data(img)
    images = io.ImageStack([tmp_path / "one.mrc"], [0])
    np.testing.assert_array_equal(images[0], img)
    with pytest.raises(io.Z3InputError, match="holds 1 image"):
        io.ImageStack([tmp_path / "one.mrc"], [1])[0]


# ==============================================================================================
# Bad input
# ==============================================================================================
def _relion31_blocks() -> dict[str, pd.DataFrame]:
    return dict(starfile.read(DRGN / "relion31.star", always_dict=True))


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
    starfile.write(dict(blocks, particles=blocks["particles"].drop(columns=["rlnAngleRot", "rlnAnglePsi"])),
                   tmp_path / "nopose.star")
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
    assert "nodefv.star: missing CTF column(s) rlnDefocusV (present: rlnDefocusU, rlnDefocusAngle, " \
           "rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast)" in msg
    assert "CTF-refined job" in msg


def test_half_an_origin_shift_pair_is_refused(tmp_path: Path) -> None:
    """rlnOriginXAngst without rlnOriginYAngst used to read as zero shifts, silently."""
    blocks = _relion31_blocks()
    blocks["particles"] = blocks["particles"].drop(columns=["rlnOriginYAngst"])
    starfile.write(blocks, tmp_path / "halfshift.star")
    with pytest.raises(io.Z3InputError, match=r"halfshift.star: .* has the origin shift column rlnOriginXAngst "
                                              r"but not rlnOriginYAngst.*Fix: add rlnOriginYAngst"):
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
    with pytest.raises(io.Z3InputError, match=r"noname.star: .*no rlnImageName column.*Columns found: "
                                              r"rlnCoordinateX.*Fix: give the particles STAR"):
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


def test_missing_stack_then_image_root(tmp_path: Path) -> None:
    shutil.copy(DRGN / "relion31.star", tmp_path / "moved.star")
    parts = io.read_particles(tmp_path / "moved.star")  # metadata-only read is fine
    assert parts.table["image_path"].iloc[0] == str(tmp_path / "relion31.mrcs")
    with pytest.raises(io.Z3InputError) as err:
        parts.images()[0]
    msg = str(err.value)
    assert "row 0" in msg and "000001@relion31.mrcs" in msg and "does not exist" in msg
    assert str(tmp_path / "relion31.mrcs") in msg and "image_root" in msg
    fixed = io.read_particles(tmp_path / "moved.star", image_root=DRGN)
    np.testing.assert_array_equal(fixed.images()[2], mrc_data(DRGN / "relion31.mrcs")[2])


def test_stack_found_in_parent_folder(tmp_path: Path) -> None:
    (tmp_path / "Extract").mkdir()
    shutil.copy(DRGN / "relion31.mrcs", tmp_path / "Extract" / "relion31.mrcs")
    (tmp_path / "Refine3D" / "job010").mkdir(parents=True)
    text = (DRGN / "relion31.star").read_text().replace("@relion31.mrcs", "@Extract/relion31.mrcs")
    star = tmp_path / "Refine3D" / "job010" / "run_data.star"
    star.write_text(text)
    parts = io.read_particles(star)
    assert parts.table["image_path"].iloc[0] == str(tmp_path / "Extract" / "relion31.mrcs")
    np.testing.assert_array_equal(parts.images()[1], mrc_data(DRGN / "relion31.mrcs")[1])


def test_index_past_end_of_stack(tmp_path: Path) -> None:
    shutil.copy(DRGN / "relion31.mrcs", tmp_path / "relion31.mrcs")
    text = (DRGN / "relion31.star").read_text().replace("000004@relion31.mrcs", "000009@relion31.mrcs")
    (tmp_path / "past.star").write_text(text)
    parts = io.read_particles(tmp_path / "past.star")
    images = parts.images()
    np.testing.assert_array_equal(images[0], mrc_data(DRGN / "relion31.mrcs")[0])
    with pytest.raises(io.Z3InputError) as err:
        images[[0, 3]]
    msg = str(err.value)
    assert "row 3" in msg and "000009@relion31.mrcs" in msg and "holds 5 image" in msg
    with pytest.raises(io.Z3InputError, match="holds 5 image"):
        images.validate()


def _write_relion30_star(path: Path, names: list[str]) -> None:
    n = len(names)
    frame = pd.DataFrame({
        "rlnImageName": names,
        "rlnDefocusU": [10000.0] * n, "rlnDefocusV": [9000.0] * n, "rlnDefocusAngle": [10.0] * n,
        "rlnVoltage": [300.0] * n, "rlnSphericalAberration": [2.7] * n,
        "rlnAmplitudeContrast": [0.1] * n, "rlnMagnification": [10000.0] * n,
        "rlnDetectorPixelSize": [2.0] * n,
    })
    starfile.write(frame, path)


def test_mixed_box_sizes(tmp_path: Path) -> None:
    io.write_stack(tmp_path / "big.mrcs", np.ones((3, 16, 16), np.float32), 2.0)
    io.write_stack(tmp_path / "small.mrcs", np.ones((2, 12, 12), np.float32), 2.0)
    names = ["1@big.mrcs", "2@big.mrcs", "3@big.mrcs", "1@small.mrcs", "2@small.mrcs"]
    _write_relion30_star(tmp_path / "mixed.star", names)
    parts = io.read_particles(tmp_path / "mixed.star")
    assert parts.pixel_size == pytest.approx(2.0)
    with pytest.raises(io.Z3InputError, match="mixed box sizes"):
        _ = parts.box
    images = parts.images()
    assert images[:3].shape == (3, 16, 16)
    with pytest.raises(io.Z3InputError) as err:
        images[[0, 3]]
    msg = str(err.value)
    assert "mixed box sizes" in msg and "row 3" in msg and "1@small.mrcs" in msg
    assert str(tmp_path / "small.mrcs") in msg
    with pytest.raises(io.Z3InputError, match="mixed box sizes"):
        images.validate()


def test_nan_pixels_are_refused(tmp_path: Path) -> None:
    stack = np.zeros((3, 8, 8), np.float32)
    stack[1, 4, 4] = np.nan
    stack[2, 0, 0] = np.inf
    with pytest.warns(RuntimeWarning, match="NaN"):  # mrcfile's own header statistics
        io.write_stack(tmp_path / "nan.mrcs", stack, 1.0)
    _write_relion30_star(tmp_path / "nan.star", ["1@nan.mrcs", "2@nan.mrcs", "3@nan.mrcs"])
    images = io.read_particles(tmp_path / "nan.star").images()
    assert np.all(images[0] == 0)
    with pytest.raises(io.Z3InputError, match=r"row 1 .*2@nan\.mrcs.*NaN"):
        images[:]
    with pytest.raises(io.Z3InputError, match=r"row 2 .*NaN or infinite"):
        images[2]


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


# ==============================================================================================
# MRC maps
# ==============================================================================================
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


def test_write_stack_is_an_image_stack(tmp_path: Path) -> None:
    stack = np.random.default_rng(3).normal(size=(4, 10, 10)).astype(np.float32)
    io.write_stack(tmp_path / "s.mrcs", stack, 2.5)
    with mrcfile.open(tmp_path / "s.mrcs") as mrc:
        assert mrc.is_image_stack()
        assert float(mrc.voxel_size.x) == pytest.approx(2.5)
        np.testing.assert_array_equal(mrc.data, stack)


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


# ==============================================================================================
# STAR writing and coefficient files
# ==============================================================================================
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
    io.write_particles_star(out, parts, zernike={"L1": 3, "L2": 2, "Rmax": 90, "basis": "xmipp",
                                                 "box": 180})
    back = starfile.read(out, always_dict=True)
    optics = back["optics"]
    for col in ("rlnOpticsGroup", "rlnImagePixelSize", "rlnImageSize", "rlnVoltage",
                "rlnSphericalAberration", "rlnAmplitudeContrast"):
        assert col in optics.columns
    assert optics["rlnImagePixelSize"].tolist() == [2.95]
    assert optics["rlnVoltage"].tolist() == [200.0]
    again = io.read_particles(out)
    assert again.source_format == "relion3.1"
    cols = ["rot", "tilt", "psi", "shift_x", "shift_y", "defocus_u", "defocus_v", "defocus_angle",
            "voltage", "cs", "amplitude_contrast", "pixel_size", "box", "optics_group",
            "random_subset", "image_index"]
    pd.testing.assert_frame_equal(again.table[cols], parts.table[cols], rtol=1e-12)


def test_coefficient_column_round_trip() -> None:
    rng = np.random.default_rng(5)
    c64 = rng.normal(size=(4, 39)) * 10.0 ** rng.integers(-6, 3, size=(4, 39))
    np.testing.assert_array_equal(
        io.parse_coefficient_column(io.format_coefficient_column(c64), n_expected=39), c64
    )
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


@pytest.mark.parametrize(("l1", "l2", "k"), [(1, 1, 4), (2, 2, 10), (3, 2, 13), (3, 3, 20),
                                             (5, 5, 56), (7, 7, 120), (8, 8, 165)])
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


# ==============================================================================================
# Atomic models
# ==============================================================================================
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

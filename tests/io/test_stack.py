"""Particle image stacks (z3lib.io.stack): memory-mapped reading, finding the stacks, bad stacks, writing.

Expected values come from the data READMEs and from the files read independently (mrcfile,
starfile, numpy), never from z3lib.io itself (tests/data, see its README).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from io_files import ASPIRE, DRGN, mrc_data

from z3lib import io
from z3lib.conventions import euler_to_matrix


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


def test_aspire_images_through_star_equal_mrcfile() -> None:
    parts = io.read_particles(ASPIRE / "sample_relion_data.star")
    expected = mrc_data(ASPIRE / "sample.mrcs")
    images = parts.images()
    np.testing.assert_array_equal(images[np.arange(17)], expected)
    order = np.array([16, 3, 3, 0, 9, 5])
    np.testing.assert_array_equal(images[order], expected[order])


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
    frame = pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnDefocusU": [10000.0] * n,
            "rlnDefocusV": [9000.0] * n,
            "rlnDefocusAngle": [10.0] * n,
            "rlnVoltage": [300.0] * n,
            "rlnSphericalAberration": [2.7] * n,
            "rlnAmplitudeContrast": [0.1] * n,
            "rlnMagnification": [10000.0] * n,
            "rlnDetectorPixelSize": [2.0] * n,
        }
    )
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


def test_write_stack_is_an_image_stack(tmp_path: Path) -> None:
    stack = np.random.default_rng(3).normal(size=(4, 10, 10)).astype(np.float32)
    io.write_stack(tmp_path / "s.mrcs", stack, 2.5)
    with mrcfile.open(tmp_path / "s.mrcs") as mrc:
        assert mrc.is_image_stack()
        assert float(mrc.voxel_size.x) == pytest.approx(2.5)
        np.testing.assert_array_equal(mrc.data, stack)


def _rss_file_kb() -> int:
    """Resident file-backed memory of this process (kB, Linux /proc)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("RssFile:")[1].split()[0])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_stacks_larger_than_a_chunk_do_not_fill_the_resident_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing and reading a 48 MB stack in 4 MB chunks: what mrcfile reads back is what was
    written, the header statistics are numpy's over all of it, and the stack's pages do not stay
    in this process's resident set (the reader drops them every RELEASE_BYTES, 4 MB here)."""
    import z3lib.io.stack as stack_module

    n, box, chunk = 750, 128, 64
    path = tmp_path / "big.mrcs"
    rng = np.random.default_rng(0)
    sums = []
    before = _rss_file_kb()
    with io.open_stack_writer(path, n, box, 1.25) as writer:
        for lo in range(0, n, chunk):
            block = rng.normal(loc=lo / n, size=(min(chunk, n - lo), box, box)).astype(np.float32)
            writer[lo : lo + len(block)] = block
            sums.append((lo, block[0, :3, :3].copy()))
    assert _rss_file_kb() - before < 8_000  # positioned writes: no mapped pages of the 48 MB
    with mrcfile.open(path, permissive=False) as mrc:
        data = np.asarray(mrc.data)
        assert mrc.is_image_stack() and mrc.voxel_size.x == pytest.approx(1.25)
        assert mrc.header.dmin == pytest.approx(data.min()) and mrc.header.dmax == pytest.approx(data.max())
        assert mrc.header.dmean == pytest.approx(data.mean(), abs=1e-6)
        assert mrc.header.rms == pytest.approx(data.std(), rel=1e-6)
    for lo, corner in sums:
        np.testing.assert_array_equal(data[lo, :3, :3], corner)
    del data
    monkeypatch.setattr(stack_module, "RELEASE_BYTES", 4 << 20)
    stack = io.ImageStack([path] * n, np.arange(n))
    before = _rss_file_kb()
    for lo in range(0, n, chunk):
        stack[np.arange(lo, min(n, lo + chunk))]
    assert _rss_file_kb() - before < 12_000  # 48 MB read, at most ~4 MB of it mapped at once
    stack.close()

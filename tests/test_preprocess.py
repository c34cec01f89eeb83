"""Preprocess: Fourier cropping, normalisation, chunked writing, validation errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from z3lib.io import Z3InputError, read_map, read_npz, read_particles, write_map
from z3lib.preprocess import fourier_crop, normalise_images
from z3lib.stages.preprocess import preprocess
from z3lib.stages.simulate import simulate_dataset

ADK = Path(__file__).parent / "data" / "mdanalysistests_adk"
DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("big,small", [(32, 16), (33, 20), (30, 21), (48, 32)])
def test_fourier_crop_resamples_band_limited_signals(big: int, small: int) -> None:
    """A sinusoid below the new Nyquist, centred on N // 2, is the same sinusoid on the new grid
    (centred on n // 2): an analytic reference for the frequency cut, the scale and the centre."""
    x = np.arange(big) - big // 2
    xs = np.arange(small) - small // 2
    k1, k2 = 2, 3
    img = 1.5 + np.cos(2 * np.pi * k1 * x[None, :] / big) * np.sin(2 * np.pi * k2 * x[:, None] / big)
    expected = 1.5 + np.cos(2 * np.pi * k1 * xs[None, :] / small) * np.sin(2 * np.pi * k2 * xs[:, None] / small)
    np.testing.assert_allclose(fourier_crop(img[None], small, ndim=2)[0], expected, atol=1e-5)
    vol = np.broadcast_to(
        np.cos(2 * np.pi * k1 * x[None, None, :] / big) * np.cos(2 * np.pi * k2 * x[:, None, None] / big), (big,) * 3
    )
    vexp = np.cos(2 * np.pi * k1 * xs[None, None, :] / small) * np.cos(2 * np.pi * k2 * xs[:, None, None] / small)
    np.testing.assert_allclose(fourier_crop(vol, small, ndim=3), np.broadcast_to(vexp, (small,) * 3), atol=1e-5)
    with pytest.raises(ValueError, match="cannot enlarge"):
        fourier_crop(img, big + 1, ndim=2)


def test_normalise_background() -> None:
    rng = np.random.default_rng(0)
    imgs = 3.0 + 2.0 * rng.normal(size=(4, 64, 64))
    out = normalise_images(imgs)
    yy, xx = np.mgrid[:64, :64]
    bg = (yy - 32) ** 2 + (xx - 32) ** 2 > (0.8 * 32) ** 2
    np.testing.assert_allclose(out[:, bg].mean(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(out[:, bg].std(1), 1.0, atol=1e-6)


def test_noise_free_images_keep_their_scale() -> None:
    """A flat background (noise-free data, round-off only) must not be divided by its round-off
    standard deviation; noisy images in the same batch are still normalised."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:32, :32] - 16
    blob = 5.0 * np.exp(-(xx**2 + yy**2) / 18.0)
    clean = blob + 1e-7 * rng.normal(size=(32, 32))  # round-off-sized background
    noisy = blob + rng.normal(size=(32, 32))
    out = normalise_images(np.stack([clean, noisy]))
    bg = xx**2 + yy**2 > (0.8 * 16) ** 2
    np.testing.assert_allclose(out[0], clean - clean[bg].mean(), atol=1e-5)
    assert out[1][bg].std() == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("sim")
    return simulate_dataset(
        out,
        start_model=ADK / "adk_closed.pdb",
        end_model=ADK / "adk_open.pdb",
        n_particles=50,
        box=40,
        pixel_size=3.0,
        resolution=9.0,
        snr=1.0,
        seed=3,
    )


def test_preprocess_outputs(sim: dict[str, Path], tmp_path: Path) -> None:
    paths = preprocess(sim["particles"], sim["reference"], sim["mask"], tmp_path / "a", box=32, chunk_size=7)
    whole = preprocess(sim["particles"], sim["reference"], sim["mask"], tmp_path / "b", box=32, chunk_size=1000)
    inp, out = read_particles(sim["particles"]), read_particles(paths["particles"])
    assert out.box == 32 and out.pixel_size == pytest.approx(3.0 * 40 / 32)
    # the same particles, in the same order, traceable to their input rows; shifts keep their Å
    assert out.raw["rlnImageOriginalName"].tolist() == inp.raw["rlnImageName"].tolist()
    np.testing.assert_allclose(out.raw["rlnOriginXAngst"], inp.raw["rlnOriginXAngst"])
    np.testing.assert_allclose(out.table["shift_x"] * out.pixel_size, inp.table["shift_x"] * inp.pixel_size)
    for col in ("rot", "tilt", "psi", "defocus_u", "random_subset"):
        np.testing.assert_allclose(out.table[col], inp.table[col])
    # images: Fourier-cropped then normalised, identical whatever the chunk size
    idx = np.arange(len(inp))
    expected = normalise_images(fourier_crop(inp.images()[idx], 32, ndim=2))
    np.testing.assert_allclose(out.images()[idx], expected, atol=1e-5)
    np.testing.assert_allclose(out.images()[idx], read_particles(whole["particles"]).images()[idx], atol=1e-5)
    ref = read_map(paths["reference"])
    assert ref.data.shape == (32,) * 3 and ref.pixel_size == pytest.approx(3.75)
    pts = read_npz(paths["points"])
    mask = read_map(paths["mask"]).data
    assert len(pts["points"]) == int(mask.sum()) > 100
    assert int(pts["box"]) == 32 and int(pts["original_box"]) == 40
    # amplitudes are the cropped reference's values at the mask voxels
    i = np.round(pts["points"][:, ::-1] + 16).astype(int)
    np.testing.assert_allclose(pts["amplitudes"], ref.data[i[:, 0], i[:, 1], i[:, 2]], rtol=1e-6)


def test_chunks_shrink_with_the_box_so_their_memory_stays_within_the_budget(
    sim: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunk of large images is cut down to the memory budget (the 512 px case, scaled down:
    a budget of 40 px images); the peak memory of writing the stack follows, the images do not change."""
    import logging
    import tracemalloc

    import z3lib.stages.preprocess as stage

    assert stage.chunk_for_box(1024, 128) == 1024 and stage.chunk_for_box(1024, 512) == 64
    peaks: dict[str, int] = {}
    write = stage._write_stack

    def measured(*args: object, **kw: object) -> None:
        tracemalloc.start()
        write(*args, **kw)  # type: ignore[arg-type]
        peaks[str(args[0].parent.name)] = tracemalloc.get_traced_memory()[1]  # type: ignore[attr-defined]
        tracemalloc.stop()

    monkeypatch.setattr(stage, "_write_stack", measured)
    whole = preprocess(sim["particles"], sim["reference"], sim["mask"], tmp_path / "whole", box=32, chunk_size=1000)
    budget = 8 * stage.CHUNK_BYTES_PER_PIXEL * 40 * 40  # 8 images of 40 px
    monkeypatch.setattr(stage, "CHUNK_MEMORY_BYTES", budget)
    with caplog.at_level(logging.INFO):
        small = preprocess(sim["particles"], sim["reference"], sim["mask"], tmp_path / "small", box=32, chunk_size=1000)
    assert "chunks of 8 particles, not 1000: 40 px images" in caplog.text
    assert peaks["small"] <= budget < peaks["whole"] / 4  # 50 images at once: about 6x the budget
    idx = np.arange(50)
    np.testing.assert_array_equal(
        read_particles(small["particles"]).images()[idx], read_particles(whole["particles"]).images()[idx]
    )


def test_preprocess_without_mask_derives_one(sim: dict[str, Path], tmp_path: Path) -> None:
    """The derived mask holds the whole particle: checked on the noise-free true map, where every
    positive voxel is particle density."""
    paths = preprocess(sim["particles"], sim["truth_reference"], None, tmp_path, box=40, points_step=2)
    mask = read_map(paths["mask"]).data
    ref = read_map(paths["reference"]).data
    assert (ref * mask).sum() > 0.98 * ref[ref > 0].sum()
    assert mask.sum() < 0.5 * mask.size  # a body, not the box
    assert int(read_npz(paths["points"])["step"]) == 2


def test_reference_pixel_size_and_box_mismatch_reported(sim: dict[str, Path], tmp_path: Path) -> None:
    vol = read_map(sim["reference"]).data
    write_map(tmp_path / "wrong_px.mrc", vol, 2.0)
    with pytest.raises(Z3InputError, match=r"wrong_px.mrc has pixel size 2 Å .* have 3 Å.*reference_pixel_size"):
        preprocess(sim["particles"], tmp_path / "wrong_px.mrc", None, tmp_path / "o", box=32)
    # the override accepts a map whose header is wrong
    preprocess(sim["particles"], tmp_path / "wrong_px.mrc", None, tmp_path / "o", box=32, reference_pixel_size=3.0)
    write_map(tmp_path / "wrong_box.mrc", vol[:36, :36, :36], 3.0)
    with pytest.raises(Z3InputError, match="does not silently resample"):
        preprocess(sim["particles"], tmp_path / "wrong_box.mrc", None, tmp_path / "o", box=32)
    with pytest.raises(Z3InputError, match="larger than the particles' box"):
        preprocess(sim["particles"], sim["reference"], None, tmp_path / "o", box=64)


def test_particles_without_poses_refused(tmp_path: Path) -> None:
    with pytest.raises(
        Z3InputError,
        match=r"empiar_10076_7.star: .* lacks the pose column\(s\) rlnAngleRot, "
        r"rlnAngleTilt, rlnAnglePsi \(present: none\).*consensus refinement",
    ):
        preprocess(
            DATA / "cryodrgn" / "empiar_10076_7.star",
            DATA / "diffmodeler_emd6824" / "emd_6824.mrc",
            None,
            tmp_path,
            box=32,
        )


def test_particles_missing_only_the_tilt_name_it(tmp_path: Path) -> None:
    """Issue 12, item 7: a STAR missing only rlnAngleTilt is refused naming that one column."""
    import starfile

    blocks = dict(starfile.read(DATA / "cryodrgn" / "relion31.star", always_dict=True))
    blocks["particles"] = blocks["particles"].drop(columns=["rlnAngleTilt"])
    starfile.write(blocks, tmp_path / "notilt.star")
    with pytest.raises(Z3InputError) as err:
        preprocess(
            tmp_path / "notilt.star", DATA / "diffmodeler_emd6824" / "emd_6824.mrc", None, tmp_path / "o", box=32
        )
    msg = str(err.value)
    assert "notilt.star" in msg and "column(s) rlnAngleTilt (present: rlnAngleRot, rlnAnglePsi)" in msg


def test_ctf_premultiplied_particles_refused(tmp_path: Path) -> None:
    """Images already multiplied by their CTF would be modelled wrongly: refused, naming the column."""
    import shutil

    import starfile

    blocks = starfile.read(DATA / "aspire" / "sample_particles_relion31.star", always_dict=True)
    blocks["optics"]["rlnCtfDataAreCtfPremultiplied"] = 1
    star = tmp_path / "premultiplied.star"
    starfile.write(blocks, star)
    shutil.copy(DATA / "aspire" / "sample.mrcs", tmp_path / "sample.mrcs")
    with pytest.raises(Z3InputError, match="rlnCtfDataAreCtfPremultiplied"):
        preprocess(star, DATA / "diffmodeler_emd6824" / "emd_6824.mrc", None, tmp_path / "out", box=32)

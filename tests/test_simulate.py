"""Ground-truth simulator: AdK motion, maps, determinism, and the noise-free round trip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from z3lib.ctf import CtfParams, apply_ctf
from z3lib.geometry import euler_to_matrix
from z3lib.io import read_map, read_model, read_particles, read_table
from z3lib.projection import project_volume
from z3lib.simulate import (
    atom_weights,
    build_motion,
    density_from_atoms,
    load_motion,
    project_atoms,
    superpose,
    true_displacements,
)
from z3lib.stages.simulate import simulate_dataset

ADK = Path(__file__).parent / "data" / "mdanalysistests_adk"


def _sim(tmp_path: Path, **kw: object) -> dict[str, Path]:
    args: dict[str, object] = {
        "start_model": ADK / "adk_closed.pdb",
        "end_model": ADK / "adk_open.pdb",
        "n_particles": 40,
        "box": 48,
        "pixel_size": 2.5,
        "resolution": 8.0,
        "snr": 0.1,
        "seed": 7,
    }
    args.update(kw)
    return simulate_dataset(tmp_path, **args)  # type: ignore[arg-type]


def test_adk_superposition_matches_documented_rmsd() -> None:
    """Cα RMSD open vs closed after optimal superposition is 6.91 Å (shared data README)."""
    closed, opened = read_model(ADK / "adk_closed.pdb"), read_model(ADK / "adk_open.pdb")
    ca = closed.atom_names == "CA"
    fitted = superpose(opened.coords[ca], closed.coords[ca])
    rmsd = math.sqrt(((fitted - closed.coords[ca]) ** 2).sum(1).mean())
    assert rmsd == pytest.approx(6.91, abs=0.01)


def test_motion_interpolates_and_displacements() -> None:
    closed, opened = read_model(ADK / "adk_closed.pdb"), read_model(ADK / "adk_open.pdb")
    w = atom_weights(closed.elements)
    motion = build_motion(closed.coords, opened.coords, w, closed.atom_names == "CA")
    np.testing.assert_allclose(motion.at(0.0), motion.start)
    np.testing.assert_allclose(motion.at(1.0), motion.end)
    mid = motion.at(0.5)
    np.testing.assert_allclose((w[:, None] * mid).sum(0) / w.sum(), 0.0, atol=1e-9)
    d = true_displacements(motion, np.array([0.0, 1.0]), 0.5)
    np.testing.assert_allclose(d[1] - d[0], motion.end - motion.start)
    assert d.shape == (2, len(w), 3)


def test_density_and_projection_integrals() -> None:
    """Each Gaussian atom integrates to its weight in the map and in its projection."""
    coords = np.array([[0.0, 0.0, 0.0], [3.0, -2.0, 1.0]])
    w = np.array([6.0, 8.0])
    vol = density_from_atoms(coords, w, 32, 1.5)
    assert vol.sum() == pytest.approx(14.0, rel=1e-4)
    # the centroid of the map sits at the mass-weighted atom position (x, y, z) → [z, y, x]
    _, _, xx = np.meshgrid(*[np.arange(32) - 16] * 3, indexing="ij")
    assert (vol * xx).sum() / vol.sum() == pytest.approx((3.0 * 8) / 14, abs=1e-3)
    img = project_atoms(
        torch.tensor(coords[None]),
        torch.tensor(w),
        torch.eye(3, dtype=torch.float64)[None],
        torch.zeros(1, 2, dtype=torch.float64),
        32,
        1.5,
    )
    assert float(img.sum()) == pytest.approx(14.0, rel=1e-4)
    # the exact projection of the voxelised map along z equals the 2D rendering
    np.testing.assert_allclose(vol.sum(0), img[0].numpy(), atol=1e-4)


def test_dataset_files_and_determinism(tmp_path: Path) -> None:
    a = _sim(tmp_path / "a")
    b = _sim(tmp_path / "b")
    c = _sim(tmp_path / "c", seed=8)
    pa, pb, pc = (read_particles(p["particles"]) for p in (a, b, c))
    assert len(pa) == 40 and pa.pixel_size == 2.5 and pa.box == 48 and pa.source_format == "relion3.1"
    ia, ib, ic = (p.images()[np.arange(40)] for p in (pa, pb, pc))
    np.testing.assert_array_equal(ia, ib)
    assert not np.allclose(ia, ic)
    gt = read_table(a["ground_truth"])
    assert np.all((gt["t"] >= 0) & (gt["t"] <= 1)) and len(gt) == 40
    np.testing.assert_allclose(gt["rot"], pa.table["rot"], atol=1e-9)
    np.testing.assert_allclose(gt["shift_x_px"], pa.table["shift_x"], atol=1e-9)
    assert set(pa.table["random_subset"]) == {1, 2}
    d = pa.table["defocus_u"]
    assert d.min() >= 10000 and d.max() <= 25000 and np.all(pa.table["defocus_v"] <= d)
    _, scalars = load_motion(a["motion"])
    assert scalars["pixel_size"] == 2.5 and scalars["reference_t"] == 0.5
    ref, start, end = (read_map(a[k]).data for k in ("truth_reference", "state_start", "state_end"))
    assert ref.shape == (48, 48, 48) and ref.sum() == pytest.approx(start.sum(), rel=1e-3)
    assert not np.allclose(start, end)
    mask = read_map(a["mask"]).data
    for m in (ref, start, end):  # the mask covers the density of every state
        assert (m * mask).sum() > 0.99 * m.sum()


def test_noise_free_round_trip_through_reader_projector_and_ctf(tmp_path: Path) -> None:
    """Projecting the written reference with the written poses and CTF gives the clean images."""
    paths = _sim(tmp_path, n_particles=30, snr=math.inf, t_range=(0.5, 0.5))
    parts = read_particles(paths["particles"])
    t = parts.table
    vol = read_map(paths["truth_reference"]).data
    rot = torch.tensor(euler_to_matrix(t["rot"].to_numpy(), t["tilt"].to_numpy(), t["psi"].to_numpy()))
    proj = project_volume(vol, rot, torch.tensor(t[["shift_x", "shift_y"]].to_numpy()))
    model = apply_ctf(proj, parts.pixel_size, CtfParams.from_table(t, dtype=torch.float64)).numpy()
    images = parts.images()[np.arange(len(parts))]
    for m, img in zip(model, images, strict=True):
        assert np.corrcoef(m.ravel(), img.ravel())[0, 1] > 0.99
    rel = np.linalg.norm(images - model) / np.linalg.norm(images)
    assert rel < 0.1  # same scale: the voxelised map + bilinear splat vs exact Gaussians

"""The consensus map and mask made from the particles alone (what the demo and benchmarks feed in)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from z3lib.analysis import fourier_shell_correlation, resolution_at
from z3lib.consensus import consensus_reference, mask_from_map
from z3lib.geometry import sphere_mask
from z3lib.io import read_map
from z3lib.stages.simulate import simulate_dataset

ADK = Path(__file__).resolve().parents[1] / "resources" / "demo"


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Noise-free, rigid (t = 0.5) particles, consensus written by simulate_dataset itself."""
    out = tmp_path_factory.mktemp("consensus")
    return simulate_dataset(
        out,
        start_model=ADK / "adk_closed.pdb",
        end_model=ADK / "adk_open.pdb",
        n_particles=400,
        box=32,
        pixel_size=4.0,
        resolution=10.0,
        snr=math.inf,
        seed=5,
        t_range=(0.5, 0.5),
    )


def test_consensus_of_rigid_particles_is_the_true_map(clean: dict[str, Path]) -> None:
    """Reconstructed from images rendered as exact projections of Gaussian atoms, the consensus
    map agrees with the map rendered from the same atoms in 3D (an independent computation)."""
    ref = read_map(clean["reference"]).data
    truth = read_map(clean["truth_reference"]).data
    fsc = fourier_shell_correlation(ref, truth, 4.0)
    low = fsc[fsc["resolution"] > 16.0]["fsc"]
    assert low.min() > 0.9
    assert resolution_at(fsc, 0.5) < 10.5  # the atoms were rendered at 10 Å resolution
    mask = read_map(clean["mask"]).data
    assert (truth * mask).sum() > 0.99 * truth.sum()
    assert mask.sum() < 0.3 * mask.size


def test_consensus_ignores_ground_truth_files(clean: dict[str, Path], tmp_path: Path) -> None:
    """Only the particles are read: the same map comes out with the truth files deleted."""
    import shutil

    work = tmp_path / "copy"
    work.mkdir()
    for key in ("particles", "stack"):
        shutil.copy(clean[key], work / clean[key].name)
    out = consensus_reference(work / "particles.star", work / "ref.mrc", work / "mask.mrc", seed=5)
    np.testing.assert_allclose(read_map(out["reference"]).data, read_map(clean["reference"]).data, atol=1e-5)


def test_mask_from_map_keeps_the_main_body_only() -> None:
    """A ball of density plus an isolated speck of noise: the mask is the dilated ball, no speck."""
    box, apix = 48, 2.0
    vol = sphere_mask(box, 8).astype(np.float32)
    vol[2, 24, 24] = 5.0  # a bright isolated voxel, within the box's ball
    mask = mask_from_map(vol, apix, lowpass=4.0, fraction=0.3, dilate=4.0)
    assert mask[24, 24, 24] == 1 and mask[2, 24, 24] == 0
    radius = (mask.sum() * 3 / (4 * np.pi)) ** (1 / 3)
    assert 8 <= radius <= 12  # the ball (8 px) dilated by 2 px, give or take the low-pass edge
    with pytest.raises(ValueError, match="fraction"):
        mask_from_map(vol, apix, fraction=1.5)

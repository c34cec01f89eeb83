"""The real-data convention check: our reader + projector reproduce cryoDRGN's toy projections.

`toy_projections.mrcs` holds 1000 noise-free, CTF-free projections of
`toymodel_small_nocenter.mrc`, made by a third party; `toy_projections_poses.star` carries their
RELION Euler angles (tests/data/README.md). A wrong Euler convention, transpose, axis order,
centre or image orientation would drop the correlation far below 0.99.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from z3lib.geometry import euler_to_matrix
from z3lib.io import read_map, read_particles
from z3lib.projection import project_volume

TOY = Path(__file__).parent / "data" / "cryodrgn"


def test_toy_projections_reproduced_through_reader_and_projector(device: str) -> None:
    particles = read_particles(TOY / "toy_projections_poses.star", pixel_size=1.0)
    assert len(particles) == 1000 and particles.has_poses
    vol = read_map(TOY / "toymodel_small_nocenter.mrc").data
    t = particles.table
    rot = euler_to_matrix(t["rot"].to_numpy(), t["tilt"].to_numpy(), t["psi"].to_numpy())
    shifts = torch.tensor(t[["shift_x", "shift_y"]].to_numpy(), device=device)
    proj = project_volume(vol, torch.tensor(rot, device=device), shifts).cpu().numpy()
    images = particles.images()[np.arange(len(particles))]
    a = proj.reshape(len(proj), -1)
    b = images.reshape(len(images), -1)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    corr = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
    assert corr.min() >= 0.99, f"worst image {corr.argmin()} correlation {corr.min():.4f}"


def test_star_angles_equal_the_ground_truth_matrices() -> None:
    particles = read_particles(TOY / "toy_projections_poses.star", pixel_size=1.0)
    t = particles.table
    ours = euler_to_matrix(t["rot"].to_numpy(), t["tilt"].to_numpy(), t["psi"].to_numpy())
    truth = np.load(TOY / "toy_rot_zerotrans.npz")["rotations"]
    np.testing.assert_allclose(ours, truth, atol=1e-5)

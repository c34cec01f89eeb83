"""z3's reader, projector, shift sign and CTF against images and CTFs made by ASPIRE.

The fixture (``tests/data/aspire_fixture``, see its README) was made once by ASPIRE 0.14.3, a
simulator not written here, with non-zero sub-pixel shifts and astigmatic CTFs: its clean images,
the map it projected, a RELION 3.1 STAR of its own metadata, and its CTF values on the image grid.
ASPIRE itself is not needed to run these tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from z3lib.ctf import CtfParams, apply_ctf, compute_ctf
from z3lib.io import read_map, read_particles
from z3lib.projection import project_volume, rotations_from_euler

FIXTURE = Path(__file__).parent / "data" / "aspire_fixture"


def _model_images(shift_sign: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """z3's clean images of the fixture's map (read_particles → project_volume → apply_ctf) and
    ASPIRE's images, both ``(8, 32, 32)``."""
    parts = read_particles(FIXTURE / "particles.star")
    t = parts.table
    volume = read_map(FIXTURE / "volume.mrc").data
    rotations = rotations_from_euler(
        *(np.array(t[c], dtype=np.float64) for c in ("rot", "tilt", "psi")), dtype=torch.float64
    )
    shifts = torch.tensor(shift_sign * t[["shift_x", "shift_y"]].to_numpy(dtype=np.float64))
    projections = project_volume(volume, rotations, shifts)
    model = apply_ctf(projections, parts.pixel_size, CtfParams.from_table(t, dtype=torch.float64)).numpy()
    with parts.images() as stack:
        images = stack[np.arange(len(parts))]
    return model, images


def _correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b, strict=True)])


def test_aspire_images_reproduced_with_z3_shift_sign_projector_and_ctf() -> None:
    """Every ASPIRE image is reproduced (correlation ≥ 0.99) by z3 from the STAR alone, with one
    common scale (within 3 %: ASPIRE's projection normalisation, about 1/64 for its 64² box); the
    same with the shifts' sign reversed fails, so the comparison does see the shift convention."""
    parts = read_particles(FIXTURE / "particles.star")
    shifts = parts.table[["shift_x", "shift_y"]].to_numpy()
    assert len(parts) == 8 and parts.box == 32 and parts.pixel_size == 3.0
    assert (np.abs(shifts) > 0.5).all()  # non-zero, sub-pixel shifts on both axes
    model, images = _model_images()
    corr = _correlations(model, images)
    assert (corr >= 0.99).all(), corr
    scale = (model * images).sum(axis=(1, 2)) / (model * model).sum(axis=(1, 2))
    assert np.ptp(scale) < 0.03 * abs(scale.mean()), scale
    flipped, _ = _model_images(shift_sign=-1.0)
    assert (_correlations(flipped, images) < 0.9).all()


def test_ctf_matches_aspire_ctf_on_the_same_grid() -> None:
    """z3's CTF from the STAR's columns equals ASPIRE's ``CTFFilter`` on the 32² image grid (to the
    rounding of the two codes' electron-wavelength constants), once ASPIRE's documented sign is
    applied (its filter is −RELION's CTF). The same comparison with the defocus angle left in
    ASPIRE's radians (its metadata pitfall) fails."""
    ref = np.load(FIXTURE / "aspire_ctf.npz")
    aspire = -ref["ctf"]  # ASPIRE's sign → RELION's (CTF(0) = +amplitude contrast)
    box, pixel_size = int(ref["box"]), float(ref["pixel_size"])
    parts = read_particles(FIXTURE / "particles.star")

    def z3_ctf(table: object) -> np.ndarray:
        ctf = compute_ctf(box, pixel_size, CtfParams.from_table(table, dtype=torch.float64), rfft=False).numpy()
        return np.fft.fftshift(ctf, axes=(-2, -1))  # DC at index box // 2, like ASPIRE's grid

    ours = z3_ctf(parts.table)
    assert ours.shape == aspire.shape == (8, 32, 32)
    np.testing.assert_allclose(ours[:, 16, 16], 0.1, atol=1e-12)  # amplitude contrast at DC
    assert (np.abs(aspire) > 0.9).any() and (aspire < -0.9).any()  # oscillating, not a trivial grid
    np.testing.assert_allclose(ours, aspire, atol=4e-3)
    radians = parts.table.assign(defocus_angle=np.deg2rad(parts.table["defocus_angle"]))
    assert np.abs(z3_ctf(radians) - aspire).max() > 0.1

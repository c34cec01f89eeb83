"""The closed-form references of tests/analytic.py against third-party results and sampling.

Other tests compare z3 with these helpers, so they are checked here against code not written
here (ASPIRE's CTF, cryoDRGN's rotation matrices) and against direct evaluation, never against z3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import starfile
from analytic import fine_frequencies, gaussian_image, gaussian_volume, relion_ctf, relion_matrix

DATA = Path(__file__).parent / "data"


def test_relion_ctf_equals_aspire_ctf() -> None:
    """relion_ctf on ASPIRE's 32² centred grid, with the fixture STAR's defocus values, equals
    ASPIRE 0.14.3's ``CTFFilter`` with its documented sign (−RELION's), to the two codes'
    wavelength-constant rounding (tests/data/aspire_fixture/README.md)."""
    ref = np.load(DATA / "aspire_fixture" / "aspire_ctf.npz")
    box, pixel_size = int(ref["box"]), float(ref["pixel_size"])
    star = starfile.read(DATA / "aspire_fixture" / "particles.star", always_dict=True)
    optics, particles = star["optics"], star["particles"]
    assert isinstance(particles, pd.DataFrame) and isinstance(optics, pd.DataFrame)
    k = (np.arange(box) - box // 2) / box  # cycles/px, DC at index box // 2 like ASPIRE's grid
    ky, kx = np.meshgrid(k, k, indexing="ij")
    ours = np.stack(
        [
            relion_ctf(
                kx,
                ky,
                pixel_size,
                row.rlnDefocusU,
                row.rlnDefocusV,
                row.rlnDefocusAngle,
                voltage=float(optics["rlnVoltage"][0]),
                cs_mm=float(optics["rlnSphericalAberration"][0]),
                q0=float(optics["rlnAmplitudeContrast"][0]),
            )
            for row in particles.itertuples()
        ]
    )
    np.testing.assert_allclose(ours, -ref["ctf"], atol=4e-3)
    assert (np.abs(ours) > 0.9).any()


def test_relion_matrix_equals_cryodrgn_rotations() -> None:
    """relion_matrix of the RELION angles cryoDRGN 4.3.1 wrote for a real cryoSPARC refinement
    gives cryoDRGN's own matrices (which are RELION's A; tests/data/cryodrgn_csparc_poses)."""
    fx = np.load(DATA / "cryodrgn_csparc_poses" / "poses.npz")
    e = fx["relion_euler_deg"]
    np.testing.assert_allclose(relion_matrix(e[:, 0], e[:, 1], e[:, 2]), fx["rotations"], atol=2e-6)


def test_gaussian_image_is_the_sum_along_z_of_the_gaussian_volume() -> None:
    """Without a filter, the closed-form projection equals the sampled Gaussians summed along z
    (A = identity): to 1e-5 of the peak for σ = 1.5 px, the Gaussian's spectrum beyond the
    pixel Nyquist that the image's frequency sum leaves out (exp(−π²σ²/2))."""
    centres, amps, sigma, box = [(3.0, -2.0, 1.0), (-4.5, 2.0, -3.0)], [1.0, 0.7], 1.5, 32
    vol = gaussian_volume(box, centres, amps, sigma)
    image = gaussian_image(box, [c[:2] for c in centres], amps, sigma, fine=128)
    np.testing.assert_allclose(image, vol.sum(axis=0), atol=1e-5 * image.max())
    kx, _ = fine_frequencies(128)
    unit = gaussian_image(box, [c[:2] for c in centres], amps, sigma, np.ones_like(kx), fine=128)
    np.testing.assert_allclose(unit, image, atol=1e-12)

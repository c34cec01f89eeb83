"""Make the ASPIRE fixture: clean CTF-modulated, shifted projections by an independent simulator.

Run from the repository root (ASPIRE 0.14.3 is in the ``bench`` extra, never needed by the tests):

    .venv/bin/python tests/data/aspire_fixture/make_fixture.py

Writes, next to this script: ``volume.mrc`` (32³, the map ASPIRE projects), ``clean.mrcs``
(8 clean images, 32², ASPIRE's projection, CTF and shifts), ``particles.star`` (RELION 3.1:
ASPIRE's own metadata for those images) and ``aspire_ctf.npz`` (ASPIRE's CTF of every image on
the 32² image grid). Only ASPIRE, numpy, mrcfile and starfile are used: nothing of z3.

ASPIRE's conventions, as it documents and as checked (see README.md):

* ``Simulation`` metadata are RELION columns: ``_rlnAngleRot/Tilt/Psi`` (degrees, ZYZ),
  ``_rlnOriginXAngst/YAngst`` (its offsets in px × pixel size), ``_rlnDefocusU/V`` (Å),
  ``_rlnVoltage`` (kV), ``_rlnSphericalAberration`` (mm), ``_rlnAmplitudeContrast``; but
  ``_rlnDefocusAngle`` holds ``CTFFilter.defocus_ang`` in **radians**: written here in degrees.
* ``CTFFilter`` is ``√(1−α²)·sin χ − α·cos χ``, minus RELION's CTF; the images get ASPIRE's own
  ``Multiply(-1)`` in the generation pipeline (what ``invert_contrast`` appends), so that
  image = RELION CTF ∗ projection (protein white). ``aspire_ctf.npz`` keeps ASPIRE's raw values.
* ``Simulation`` states are 1-based; amplitudes are set to 1 and no noise is added.

The images are simulated in a 64² box (the map zero-padded to 64³, centre 32) and cropped to the
central 32² (centre 16): ASPIRE filters and shifts periodically on its own grid, so the CTF's
delocalised signal and the shifted projections then do not wrap around inside the kept box.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

HERE = Path(__file__).resolve().parent
BOX = 32  # fixture box (px)
SIM_BOX = 64  # ASPIRE's simulation box (px)
PIXEL_SIZE = 3.0  # Å
N = 8
SEED = 20261127
VOLTAGE, CS, AMPLITUDE_CONTRAST = 300.0, 2.7, 0.1


def blob_volume(box: int, rng: np.random.Generator) -> np.ndarray:
    """An asymmetric ``[z, y, x]`` map: six Gaussian blobs of different widths and weights, all
    within 8 px of the centre ``box // 2``."""
    z, y, x = np.meshgrid(*[np.arange(box) - box // 2] * 3, indexing="ij")
    vol = np.zeros((box,) * 3)
    centres = [
        (5.0, 1.0, -2.0),
        (-4.0, 3.0, 1.0),
        (0.5, -5.0, 2.5),
        (-1.0, -1.0, -5.0),
        (2.0, 4.0, 4.0),
        (-5.5, -3.0, -1.5),
    ]
    for (cx, cy, cz), sigma, weight in zip(centres, rng.uniform(1.6, 2.6, 6), rng.uniform(0.5, 1.5, 6), strict=True):
        vol += weight * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))
    return vol.astype(np.float32)


def main() -> None:
    rng = np.random.default_rng(SEED)
    vol = blob_volume(BOX, rng)
    pad = (SIM_BOX - BOX) // 2
    vol_sim = np.pad(vol, pad)  # centre 16 → 32
    # non-zero sub-pixel offsets on both axes, |offset| ≥ 0.75 px
    offsets = rng.uniform(0.75, 3.0, (N, 2)) * rng.choice([-1.0, 1.0], (N, 2))
    defocus_u = rng.uniform(10000.0, 20000.0, N)  # Å: 1–2 µm
    defocus_v = defocus_u - rng.uniform(300.0, 1500.0, N)  # astigmatism
    defocus_angle = rng.uniform(0.0, np.pi, N)  # radians (ASPIRE's unit)

    here = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)  # importing aspire writes logs/ into the working directory
        try:
            import aspire
            from aspire.image.xform import Multiply
            from aspire.operators import CTFFilter
            from aspire.source import Simulation
            from aspire.volume import Volume

            filters = [
                CTFFilter(
                    voltage=VOLTAGE,
                    defocus_u=float(u),
                    defocus_v=float(v),
                    defocus_ang=float(a),
                    Cs=CS,
                    alpha=AMPLITUDE_CONTRAST,
                )
                for u, v, a in zip(defocus_u, defocus_v, defocus_angle, strict=True)
            ]
            sim = Simulation(
                n=N,
                vols=Volume(vol_sim, pixel_size=PIXEL_SIZE),
                states=np.ones(N, dtype=int),
                unique_filters=filters,
                filter_indices=np.arange(N),
                offsets=offsets.astype(np.float32),
                amplitudes=np.ones(N, dtype=np.float32),
                seed=SEED,
                dtype=np.float32,
            )
            sim.generation_pipeline.add_xform(Multiply(-1))  # ASPIRE's CTF is −RELION's
            images = sim.images[:N].asnumpy().astype(np.float32)
            meta = sim.get_metadata(as_dict=True)
            ctf = np.stack([f.evaluate_grid(BOX, dtype=np.float64, pixel_size=PIXEL_SIZE) for f in filters])
            version = aspire.__version__
        finally:
            os.chdir(here)
    clean = images[:, pad : pad + BOX, pad : pad + BOX]

    def col(name: str) -> np.ndarray:
        return np.asarray(meta[name], dtype=np.float64)

    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@clean.mrcs" for i in range(N)],
            "rlnAngleRot": col("_rlnAngleRot"),
            "rlnAngleTilt": col("_rlnAngleTilt"),
            "rlnAnglePsi": col("_rlnAnglePsi"),
            "rlnOriginXAngst": col("_rlnOriginXAngst"),
            "rlnOriginYAngst": col("_rlnOriginYAngst"),
            "rlnDefocusU": col("_rlnDefocusU"),
            "rlnDefocusV": col("_rlnDefocusV"),
            "rlnDefocusAngle": np.rad2deg(col("_rlnDefocusAngle")),  # ASPIRE's metadata holds radians
            "rlnOpticsGroup": np.ones(N, dtype=int),
        }
    )
    for name, value in (
        ("_rlnVoltage", VOLTAGE),
        ("_rlnSphericalAberration", CS),
        ("_rlnAmplitudeContrast", AMPLITUDE_CONTRAST),
    ):
        if not np.allclose(col(name), value):
            raise RuntimeError(f"ASPIRE's metadata {name} is not the simulated {value}")
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnVoltage": [VOLTAGE],
            "rlnSphericalAberration": [CS],
            "rlnAmplitudeContrast": [AMPLITUDE_CONTRAST],
            "rlnImagePixelSize": [PIXEL_SIZE],
            "rlnImageSize": [BOX],
            "rlnImageDimensionality": [2],
        }
    )
    star = HERE / "particles.star"
    starfile.write({"optics": optics, "particles": particles}, star, overwrite=True, float_format="%.8f")
    # RELION's version line instead of starfile's time-stamped comment: the same script, the same file
    lines = [line for line in star.read_text().splitlines() if not line.startswith("# Created by")]
    text = "\n".join(lines).strip("\n").replace("data_", "# version 30001\n\ndata_") + "\n"
    star.write_text(text.replace("\n\n\n", "\n\n"))
    for name, data in (("volume.mrc", vol), ("clean.mrcs", clean)):
        with mrcfile.new(HERE / name, overwrite=True) as mrc:
            mrc.set_data(data)
            if data is clean:
                mrc.set_image_stack()
            mrc.voxel_size = PIXEL_SIZE
            mrc.header.label[0] = b"ASPIRE fixture, tests/data/aspire_fixture/make_fixture.py"  # no time stamp
    np.savez_compressed(
        HERE / "aspire_ctf.npz",
        ctf=ctf.astype(np.float64),
        pixel_size=np.float64(PIXEL_SIZE),
        box=np.int64(BOX),
        aspire_version=np.str_(version),
        note=np.str_(
            "ASPIRE CTFFilter.evaluate_grid(32, pixel_size=3.0): (8, 32, 32) [y, x], DC at index 16 "
            "(centred, not fft order); ASPIRE's sign (minus RELION's CTF); image i = row i of "
            "particles.star"
        ),
    )
    print(f"ASPIRE {version}: wrote {N} images of {BOX}² px at {PIXEL_SIZE} Å to {HERE}")


if __name__ == "__main__":
    main()

"""Stage ``simulate``: the demo's flexible dataset with ground truth, as a RELION 3.1 project.

The particles are :func:`z3lib.simulate.simulate_particles` rendered from two atomic models.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from z3lib.conventions import box_center
from z3lib.io import AtomicModel
from z3lib.simulate import (
    Motion,
    SimulatedParticles,
    atom_weights,
    build_motion,
    density_from_atoms,
    gaussian_sigma,
    make_mask,
    simulate_particles,
)

#: name → file of everything :func:`simulate_dataset` writes.
_FILES = {
    "particles": "particles.star",
    "stack": "particles.mrcs",
    "ground_truth": "ground_truth.tsv",
    "motion": "motion.npz",
    "reference": "reference.mrc",
    "mask": "mask.mrc",
    "truth_reference": "truth_reference.mrc",
    "state_start": "state_start.mrc",
    "state_end": "state_end.mrc",
    "reference_model": "reference_model.pdb",
}


def simulate_dataset(
    out_dir: str | Path,
    *,
    start_model: str | Path,
    end_model: str | Path,
    n_particles: int,
    box: int,
    pixel_size: float,
    resolution: float,
    snr: float,
    seed: int,
    reference_t: float = 0.5,
    shift_sigma: float = 1.0,
    defocus_min: float = 10000.0,
    defocus_max: float = 25000.0,
    t_range: tuple[float, float] = (0.0, 1.0),
    t_values: npt.ArrayLike | None = None,
    consensus: bool = True,
    log: logging.Logger | None = None,
) -> dict[str, Path]:
    """Simulate a flexible dataset with ground truth and write it as a RELION 3.1 project.

    The two models (same atoms, same order) are superposed on their Cα atoms and interpolated
    linearly; each particle takes ``t ~ U(t_range)``, or one of ``t_values`` at random (discrete
    states, e.g. ``(0, 1)`` for a two-state dataset). Files written in ``out_dir`` (atomically):

    ``particles.star`` + ``particles.mrcs``
        RELION 3.1 optics + particles with poses, shifts (Å), CTF and ``rlnRandomSubset``.
    ``ground_truth.tsv``
        per particle: ``t``, Euler angles, shifts (px), defocus.
    ``motion.npz``
        ``start``, ``end`` (Å, superposed and centred), ``weights``, ``pixel_size``, ``box``,
        ``reference_t``, ``sigma`` (px): the true displacement of every atom of every particle is
        ``(t − reference_t)(end − start)`` (see :func:`z3lib.simulate.true_displacements`).
    ``reference.mrc``, ``mask.mrc``
        the consensus map reconstructed from the noisy particles with their poses and CTFs, and
        the mask derived from that map alone (:func:`z3lib.consensus.consensus_reference`): what
        a consensus refinement would hand over, so no ground truth reaches the pipeline's inputs.
        With ``consensus=False`` they are the true map at ``reference_t`` and a mask covering
        every state instead (for unit tests that need an exact reference).
    ``truth_reference.mrc``, ``state_start.mrc``, ``state_end.mrc``
        the true maps at ``reference_t``, 0 and 1 (ground truth: for evaluation only).
    ``reference_model.pdb``
        the atomic model at ``reference_t`` in the maps' frame (MRC origin at voxel 0: centred
        coordinates + ``(box // 2) · pixel_size``).

    Returns
    -------
    name → path of every file written.
    """
    from z3lib.io import open_stack_writer

    logger = log or logging.getLogger(__name__)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    start, motion = _read_motion(start_model, end_model)
    rng = np.random.default_rng(seed)
    t = (
        rng.uniform(t_range[0], t_range[1], size=n_particles)
        if t_values is None
        else rng.choice(np.asarray(t_values, dtype=np.float64), size=n_particles)
    )
    sim = simulate_particles(
        motion,
        n=n_particles,
        box=box,
        pixel_size=pixel_size,
        resolution=resolution,
        snr=snr,
        seed=seed + 1,
        t=t,
        shift_sigma=shift_sigma,
        defocus_range=(defocus_min, defocus_max),
    )
    elapsed = time.perf_counter() - t0
    logger.info(
        "simulated %d particles of %d px in %.1f s (noise sigma %.3g)", n_particles, box, elapsed, sim.noise_sigma
    )
    sigma_px = gaussian_sigma(resolution) / pixel_size
    paths = {name: out / fname for name, fname in _FILES.items()}
    with open_stack_writer(paths["stack"], n_particles, box, pixel_size) as data:
        data[:] = sim.images
    subset = rng.permutation(np.arange(n_particles) % 2) + 1
    _write_star(paths["particles"], paths["stack"].name, sim, subset, box, pixel_size)
    _write_maps(paths, motion, box, pixel_size, sigma_px, reference_t, consensus=consensus, seed=seed, log=logger)
    _write_truth(
        paths,
        sim,
        start,
        motion,
        box=box,
        pixel_size=pixel_size,
        reference_t=reference_t,
        sigma_px=sigma_px,
        snr=snr,
        resolution=resolution,
    )
    logger.info("wrote %s in %.1f s", ", ".join(p.name for p in paths.values()), time.perf_counter() - t0)
    return paths


def _write_maps(
    paths: dict[str, Path],
    motion: Motion,
    box: int,
    pixel_size: float,
    sigma_px: float,
    reference_t: float,
    *,
    consensus: bool,
    seed: int,
    log: logging.Logger,
) -> None:
    """Write the true maps at ``reference_t``, 0 and 1, and the pipeline's reference and mask.

    With ``consensus`` the reference is reconstructed from the particles of ``paths["particles"]``
    and the mask derived from it; else they are the true reference map and a mask over every state.
    """
    from z3lib.consensus import consensus_reference
    from z3lib.io import write_map

    maps = {}
    for name, tt in (("truth_reference", reference_t), ("state_start", 0.0), ("state_end", 1.0)):
        maps[name] = density_from_atoms(motion.at(tt) / pixel_size, motion.weights, box, sigma_px)
        write_map(paths[name], maps[name], pixel_size)
    if consensus:
        consensus_reference(paths["particles"], paths["reference"], paths["mask"], seed=seed, log=log)
    else:
        write_map(paths["reference"], maps["truth_reference"], pixel_size)
        write_map(paths["mask"], make_mask(list(maps.values())), pixel_size)


def _read_motion(start_model: str | Path, end_model: str | Path) -> tuple[AtomicModel, Motion]:
    """Read the start model and the motion between the two models (same atoms, same order).

    Both are superposed on their Cα atoms.
    """
    from z3lib.io import read_model

    start, end = read_model(start_model), read_model(end_model)
    if len(start) != len(end) or np.any(start.atom_names != end.atom_names):
        raise ValueError(
            f"{start_model} and {end_model} must hold the same atoms in the same order "
            f"({len(start)} vs {len(end)} atoms)"
        )
    weights = atom_weights(start.elements)
    ca = (start.atom_names == "CA") & (start.elements == "C")
    return start, build_motion(start.coords, end.coords, weights, ca if ca.any() else None)


def _write_star(
    path: Path, stack_name: str, sim: SimulatedParticles, subset: np.ndarray, box: int, pixel_size: float
) -> None:
    """Write the particles' RELION 3.1 STAR.

    One optics group (300 kV, Cs 2.7 mm, Q0 0.1), the true poses, shifts (Å), CTF and the half
    sets ``subset`` (1 or 2), images in ``stack_name``.
    """
    from z3lib.io import write_star

    n_particles = len(subset)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [pixel_size],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in range(n_particles)],
            "rlnAngleRot": sim.rot,
            "rlnAngleTilt": sim.tilt,
            "rlnAnglePsi": sim.psi,
            "rlnOriginXAngst": sim.shift_x * pixel_size,
            "rlnOriginYAngst": sim.shift_y * pixel_size,
            "rlnDefocusU": sim.defocus_u,
            "rlnDefocusV": sim.defocus_v,
            "rlnDefocusAngle": sim.defocus_angle,
            "rlnPhaseShift": np.zeros(n_particles),
            "rlnCtfBfactor": np.zeros(n_particles),
            "rlnCtfScalefactor": np.ones(n_particles),
            "rlnOpticsGroup": np.ones(n_particles, dtype=int),
            "rlnRandomSubset": subset,
            "rlnClassNumber": np.ones(n_particles, dtype=int),
        }
    )
    write_star(path, {"optics": optics, "particles": particles})


def _write_truth(
    paths: dict[str, Path],
    sim: SimulatedParticles,
    start: AtomicModel,
    motion: Motion,
    *,
    box: int,
    pixel_size: float,
    reference_t: float,
    sigma_px: float,
    snr: float,
    resolution: float,
) -> None:
    """Write the ground truth.

    ``ground_truth.tsv`` (per particle), ``motion.npz`` and the atomic model at ``reference_t`` in
    the maps' frame (``reference_model.pdb``).
    """
    from z3lib.io import write_model_pdb, write_npz, write_table

    write_table(
        paths["ground_truth"],
        pd.DataFrame(
            {
                "particle": np.arange(len(sim.t)),
                "t": sim.t,
                "rot": sim.rot,
                "tilt": sim.tilt,
                "psi": sim.psi,
                "shift_x_px": sim.shift_x,
                "shift_y_px": sim.shift_y,
                "defocus_u": sim.defocus_u,
                "defocus_v": sim.defocus_v,
                "defocus_angle": sim.defocus_angle,
            }
        ),
    )
    write_npz(
        paths["motion"],
        start=motion.start,
        end=motion.end,
        weights=motion.weights,
        pixel_size=float(pixel_size),
        box=float(box),
        reference_t=float(reference_t),
        sigma=float(sigma_px),
        snr=float(snr),
        resolution=float(resolution),
    )
    # the atomic model of the reference conformation, in the maps' frame (MRC origin at voxel 0,
    # as ChimeraX and Coot place it): centred coordinates + the box centre in Å
    centre = box_center(box) * pixel_size
    write_model_pdb(paths["reference_model"], start, motion.at(reference_t) + centre)

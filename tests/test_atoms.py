"""An atomic model as the decoder's point cloud (issue 15, item 1): the atoms' Gaussians fitted to
a map made by gemmi, the covalent geometry of a real model, the decoder's blurred projection
against the analytic Gaussian, and the bond regulariser against a uniform stretch."""

from __future__ import annotations

import logging
from pathlib import Path

import gemmi
import numpy as np
import pytest
import torch

from z3lib import atoms as at
from z3lib import zernike as zk
from z3lib.analysis import splat_trilinear
from z3lib.decoder import DecoderOptions, PhysicalDecoder
from z3lib.io import Z3InputError, read_model, read_npz, write_model_pdb
from z3lib.simulate import atom_weights
from z3lib.stages.preprocess import write_atom_cloud

ADK = Path(__file__).resolve().parents[1] / "resources" / "demo" / "adk_closed.pdb"  # 4AKE, closed AdK
BOX, APIX = 64, 2.2


@pytest.fixture(scope="module")
def adk() -> dict[str, np.ndarray]:
    """AdK's heavy atoms centred in a 64 px box at 2.2 Å/px, and gemmi's map of them there."""
    model = read_model(ADK)
    heavy = at.heavy_atoms(model.elements)
    xyz = model.coords[heavy]
    shift = (BOX // 2) * APIX - xyz.mean(0)
    structure = gemmi.read_structure(str(ADK))
    structure.remove_hydrogens()
    for chain in structure[0]:
        for residue in chain:
            for atom in residue:
                atom.pos = gemmi.Position(atom.pos.x + shift[0], atom.pos.y + shift[1], atom.pos.z + shift[2])
    structure.cell = gemmi.UnitCell(BOX * APIX, BOX * APIX, BOX * APIX, 90, 90, 90)
    structure.spacegroup_hm = "P 1"
    calc = gemmi.DensityCalculatorE()  # electron scattering factors (gemmi's own code)
    calc.d_min, calc.rate = 2 * APIX, 1.0  # grid spacing d_min / (2 rate) = APIX
    calc.set_grid_cell_and_spacegroup(structure)
    calc.put_model_density_on_grid(structure[0])
    volume = np.array(calc.grid, copy=False).transpose(2, 1, 0).astype(np.float64)  # [x, y, z] → [z, y, x]
    assert volume.shape == (BOX,) * 3
    return {
        "xyz": xyz + shift,
        "points": at.model_to_points(xyz + shift, APIX, BOX, APIX),
        "weights": atom_weights(model.elements[heavy]),
        "volume": volume,
        "names": model.atom_names[heavy],
        "chains": model.chain_ids[heavy],
        "numbers": model.residue_numbers[heavy],
    }


def test_atoms_fitted_to_a_gemmi_map_reproduce_it(adk: dict[str, np.ndarray]) -> None:
    """gemmi's density of AdK blurred to a consensus-like resolution (σ 2 px ≈ 8 Å): one Gaussian
    width and non-negative amplitudes per atom reproduce it over its support."""
    volume = at.gaussian_filter_3d(adk["volume"], 2.0)
    mask = volume > 0.05 * volume.max()
    fit = at.fit_atom_amplitudes(volume, adk["points"], adk["weights"], mask=mask)
    assert fit.correlation > 0.99  # measured 0.999
    assert 1.5 <= fit.sigma_px <= 3.0  # gemmi's atoms (≈ 1 px) blurred by 2 px: √(1 + 4) ≈ 2.2
    assert (fit.amplitudes >= 0).all() and fit.amplitudes.mean() > 0


def test_splat_and_gather_are_adjoint_and_the_filter_is_the_analytic_gaussian() -> None:
    rng = np.random.default_rng(0)
    points = rng.uniform(-10, 10, size=(50, 3))
    a, grid = rng.normal(size=50), rng.normal(size=(24, 24, 24))
    assert np.sum(splat_trilinear(points, a, (24,) * 3) * grid) == pytest.approx(
        np.sum(a * at._gather(grid, points)), rel=1e-10
    )
    delta = np.zeros((32, 32, 32))
    delta[16, 16, 16] = 1.0
    sigma = 1.5
    z, y, x = np.meshgrid(*(np.arange(32) - 16,) * 3, indexing="ij")
    analytic = np.exp(-(x**2 + y**2 + z**2) / (2 * sigma**2)) / (2 * np.pi * sigma**2) ** 1.5
    np.testing.assert_allclose(at.gaussian_filter_3d(delta, sigma), analytic, atol=1e-6)


def test_covalent_geometry_of_a_real_model(adk: dict[str, np.ndarray]) -> None:
    """AdK (one chain, 214 residues): every backbone bond and peptide bond is found, no pair
    further apart than a bond is one, and 213 Cα–Cα links."""
    pairs = at.model_pairs(adk["xyz"], adk["names"], adk["chains"], adk["numbers"])
    lengths = np.linalg.norm(adk["xyz"][pairs.bonds[:, 0]] - adk["xyz"][pairs.bonds[:, 1]], axis=1)
    assert lengths.min() > 1.1 and lengths.max() <= at.BOND_MAX_A
    found = {tuple(p) for p in pairs.bonds.tolist()}
    names, numbers = adk["names"], adk["numbers"]
    row = {(int(r), str(n)): i for i, (r, n) in enumerate(zip(numbers, names, strict=True))}
    residues = sorted(set(numbers.tolist()))
    checked = 0
    for r in residues:
        for a, b in (("N", "CA"), ("CA", "C"), ("C", "O")):
            if (r, a) in row and (r, b) in row:  # the C-terminal residue has no O here
                assert tuple(sorted((row[(r, a)], row[(r, b)]))) in found, (r, a, b)
                checked += 1
        if r + 1 in residues:
            assert tuple(sorted((row[(r, "C")], row[(r + 1, "N")]))) in found, r
    assert checked >= 3 * len(residues) - 1
    assert len(pairs.ca) == len(residues) - 1 == 213


def test_geometry_stats_against_rigid_motion_and_uniform_stretch(adk: dict[str, np.ndarray]) -> None:
    xyz = adk["xyz"]
    pairs = at.model_pairs(xyz, adk["names"], adk["chains"], adk["numbers"])
    axis = np.array([1.0, 2.0, 2.0]) / 3.0
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(0.7) * k + (1 - np.cos(0.7)) * k @ k  # 40° about (1, 2, 2) / 3
    rigid = at.geometry_stats(xyz, xyz @ rotation.T + 5.0, pairs)
    assert rigid["bond_rmsd_A"] < 1e-9 and rigid["ca_rmsd_A"] < 1e-9
    assert rigid["clashes"] == rigid["clashes_reference"]
    stretched = at.geometry_stats(xyz, 1.1 * xyz, pairs)  # every length × 1.1: change 0.1 L
    bonds = np.linalg.norm(xyz[pairs.bonds[:, 0]] - xyz[pairs.bonds[:, 1]], axis=1)
    assert stretched["bond_rmsd_A"] == pytest.approx(0.1 * np.sqrt(np.mean(bonds**2)), rel=1e-9)
    squeezed = xyz.copy()
    a, b = pairs.ca[10, 0], pairs.ca[40, 0]  # two Cα far apart in sequence, put 1 Å apart
    squeezed[a] = squeezed[b] + np.array([1.0, 0.0, 0.0])
    assert at.geometry_stats(xyz, squeezed, pairs)["clashes"] >= rigid["clashes_reference"] + 1


def _decoder(points: np.ndarray, amplitudes: np.ndarray, box: int, **kwargs: object) -> PhysicalDecoder:
    options = DecoderOptions(roughness="strain", ctf_pad=2, learn_reference=False)
    spec = zk.ZernikeSpec(3, 3, "orthonormal", box)
    return PhysicalDecoder(
        torch.as_tensor(points, dtype=torch.float32),
        torch.as_tensor(amplitudes, dtype=torch.float32),
        spec,
        1.0,
        options,
        **kwargs,  # type: ignore[arg-type]
    )


def test_blurred_point_projects_to_the_analytic_2d_gaussian() -> None:
    """One point of amplitude 1 at the box centre with σ = 1.5 px: its projection is
    exp(−r²/2σ²)/(2πσ²), whatever the rotation."""
    box, sigma = 48, 1.5
    decoder = _decoder(np.zeros((1, 3)), np.ones(1), box, blur_px=sigma)
    rotations = torch.as_tensor(np.stack([np.eye(3), np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]])]))
    images = decoder(None, rotations.float(), torch.zeros(2, 2), None).double().numpy()
    y, x = np.meshgrid(np.arange(box) - box // 2, np.arange(box) - box // 2, indexing="ij")
    analytic = np.exp(-(x**2 + y**2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    for image in images:
        np.testing.assert_allclose(image, analytic, atol=2e-5)


def test_pair_strain_is_zero_for_a_translation_and_the_stretch_for_a_uniform_one() -> None:
    rng = np.random.default_rng(3)
    box = 32
    points = rng.uniform(-8, 8, size=(40, 3))
    pairs = np.array([[i, i + 1] for i in range(39)])
    decoder = _decoder(points, np.ones(40), box, pairs=torch.as_tensor(pairs))
    spec = decoder.spec
    shift = spec.fit(points, np.tile([1.0, -0.5, 2.0], (40, 1)))
    eps = 0.05
    stretch = spec.fit(points, eps * points)  # d = ε x: every distance × (1 + ε)
    strain = decoder.pair_strain(torch.as_tensor(np.stack([shift, stretch]), dtype=torch.float32)).numpy()
    lengths = np.linalg.norm(points[pairs[:, 0]] - points[pairs[:, 1]], axis=1)
    assert strain[0] == pytest.approx(0.0, abs=1e-8)
    assert strain[1] == pytest.approx(np.mean((eps * lengths) ** 2), rel=1e-3)
    # contacts 3 px apart (pixel 1 Å, clash below 2.2 Å) squeezed by 40 %: each ends 1.8 px apart
    contact_points = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, -3.0]])
    contacts = np.array([[0, 1], [0, 2], [0, 3]])
    squeezer = _decoder(contact_points, np.ones(4), box, contacts=torch.as_tensor(contacts))
    squeeze = squeezer.spec.fit(contact_points, -0.4 * contact_points)
    penalty = squeezer.clash_penalty(torch.as_tensor(np.stack([squeeze, 0 * squeeze]), dtype=torch.float32)).numpy()
    assert penalty[0] == pytest.approx((at.CLASH_A - 1.8) ** 2, rel=1e-3) and penalty[1] == 0.0


def test_regularisers_average_over_the_smoothing_points() -> None:
    """Atoms with the mask's voxels as smoothing points (and a learned reference): the field energy
    of d = ε x is the mean of ε²|x|² over the voxels, not over the atoms."""
    rng = np.random.default_rng(4)
    box, eps = 32, 0.05
    atoms_xyz = rng.uniform(-3, 3, size=(30, 3))
    voxels = rng.uniform(-10, 10, size=(500, 3))
    options = DecoderOptions(roughness="strain", ctf_pad=2, learn_reference=True)
    decoder = PhysicalDecoder(
        torch.as_tensor(atoms_xyz, dtype=torch.float32),
        torch.ones(30),
        zk.ZernikeSpec(3, 3, "orthonormal", box),
        1.0,
        options,
        blur_px=1.0,
        smooth_points=torch.as_tensor(voxels, dtype=torch.float32),
    )
    stretch = decoder.spec.fit(voxels, eps * voxels)
    energy = float(decoder.field_energy(torch.as_tensor(stretch[None], dtype=torch.float32))[0])
    assert energy == pytest.approx(np.mean(eps**2 * (voxels**2).sum(1)), rel=1e-3)
    assert decoder.values().shape == (30,)  # one learned amplitude per atom
    image = decoder(torch.as_tensor(stretch[None], dtype=torch.float32), torch.eye(3)[None], torch.zeros(1, 2), None)
    assert image.shape == (1, box, box) and bool(torch.isfinite(image).all())


def test_atom_cloud_refuses_a_model_outside_the_map(adk: dict[str, np.ndarray], tmp_path: Path) -> None:
    """A model not fitted into the map (here 40 Å off) is one clear message; a fitted one is
    written with its Gaussian width and pairs."""
    volume = at.gaussian_filter_3d(adk["volume"], 2.0)
    mask = (volume > 0.05 * volume.max()).astype(np.float32)
    model = read_model(ADK)
    heavy = at.heavy_atoms(model.elements)
    shift = (BOX // 2) * APIX - model.coords[heavy].mean(0)
    fitted, off = tmp_path / "fitted.pdb", tmp_path / "off.pdb"
    write_model_pdb(fitted, model, model.coords + shift)
    write_model_pdb(off, model, model.coords + shift + np.array([40.0, 0.0, 0.0]))
    log = logging.getLogger("test")
    voxels = np.argwhere(mask > 0)[:, ::-1] - BOX // 2  # (x, y, z) px of the mask's voxels
    write_atom_cloud(tmp_path / "atoms.npz", fitted, volume, mask, BOX, APIX, BOX, APIX, log, voxels.astype(float))
    cloud = read_npz(tmp_path / "atoms.npz")
    assert len(cloud["points"]) == heavy.sum() and float(cloud["blur_px"]) > 1.0
    np.testing.assert_array_equal(cloud["smooth_points"], voxels)  # the regularisers' points: the mask
    assert cloud["pairs"].shape[1] == 2 and str(cloud["kind"]) == "atoms"
    with pytest.raises(Z3InputError, match="fitted into the consensus map"):
        write_atom_cloud(tmp_path / "bad.npz", off, volume, mask, BOX, APIX, BOX, APIX, log)
    assert not (tmp_path / "bad.npz").exists()

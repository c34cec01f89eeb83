"""Atomic models (PDB/mmCIF through gemmi): :func:`read_model` and :func:`write_model_pdb`.

Coordinates are ``(x, y, z)`` in Å; only the first model of a file is read, every atom kept in
file order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gemmi
import numpy as np
import numpy.typing as npt

from z3lib.io._common import PathLike, Z3InputError, _check_readable_file, atomic_path, logger

_TWO_LETTER_IONS = {
    "CA",
    "MG",
    "ZN",
    "NA",
    "CL",
    "FE",
    "MN",
    "CU",
    "CO",
    "NI",
    "CD",
    "HG",
    "BR",
    "SE",
    "LI",
}


def _guess_element(atom_name: str, residue_name: str) -> str:
    """Element from a PDB atom name when the file has no element column (CHARMM-style PDBs)."""
    name = atom_name.strip().upper()
    res = residue_name.strip().upper()
    if name == res and name in _TWO_LETTER_IONS:
        return name.capitalize()
    letters = name.lstrip("0123456789")
    first = letters[:1]
    if first in ("H", "C", "N", "O", "S", "P"):
        return first
    return first or "X"


def _pdb_has_element_columns(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("ATOM  ", "HETATM")) and line[76:78].strip():
                    return True
    except OSError:
        return True
    return False


@dataclass
class AtomicModel:
    """Atoms of the first model of a PDB/mmCIF file, in file order.

    Attributes
    ----------
    coords
        ``(N, 3)`` float64 positions ``(x, y, z)`` in Å.
    elements
        ``(N,)`` element symbols (``"C"``, ``"Ca"``…).
    atom_names, residue_names, chain_ids, segment_ids
        ``(N,)`` str.
    residue_numbers
        ``(N,)`` int.
    bfactors
        ``(N,)`` float64 (Å²).
    path
        The file read.
    """

    coords: npt.NDArray[np.float64]
    elements: npt.NDArray[np.str_]
    atom_names: npt.NDArray[np.str_]
    residue_names: npt.NDArray[np.str_]
    chain_ids: npt.NDArray[np.str_]
    segment_ids: npt.NDArray[np.str_]
    residue_numbers: npt.NDArray[np.int64]
    bfactors: npt.NDArray[np.float64]
    path: Path
    _structure: Any = field(repr=False, compare=False, default=None)

    def __len__(self) -> int:
        return len(self.coords)


def read_model(path: PathLike) -> AtomicModel:
    """Read an atomic model (PDB or mmCIF, by extension or content) with gemmi.

    Only the first model is read; every atom is kept (hydrogens, alternate locations) in file
    order. For PDB files without element columns (77–78), elements are guessed from the atom
    names (first letter; ions whose residue name equals the atom name keep two letters), because
    gemmi's guess mistakes left-aligned CHARMM names (``CA`` → calcium, ``HG1`` → mercury).

    Raises
    ------
    Z3InputError
        Missing, unreadable or empty file.
    """
    p = Path(path)
    _check_readable_file(p, "atomic model")
    if p.stat().st_size == 0:
        raise Z3InputError(f"{p} is empty; expected a PDB or mmCIF atomic model")
    try:
        st = gemmi.read_structure(str(p), format=gemmi.CoorFormat.Detect)
    except Exception as exc:
        raise Z3InputError(f"could not read {p} as PDB or mmCIF ({type(exc).__name__}: {exc})") from exc
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise Z3InputError(f"{p} holds no atoms; expected a PDB or mmCIF atomic model")
    for extra in range(len(st) - 1, 0, -1):
        del st[extra]
    is_pdb = st.input_format == gemmi.CoorFormat.Pdb
    guess = is_pdb and not _pdb_has_element_columns(p)
    coords, elements, names, resn, chains, segs, resi, bfac = [], [], [], [], [], [], [], []
    for chain in st[0]:
        for residue in chain:
            for atom in residue:
                if guess:
                    atom.element = gemmi.Element(_guess_element(atom.name, residue.name))
                pos = atom.pos
                coords.append((pos.x, pos.y, pos.z))
                elements.append(atom.element.name)
                names.append(atom.name)
                resn.append(residue.name)
                chains.append(chain.name)
                segs.append(residue.segment)
                resi.append(residue.seqid.num)
                bfac.append(atom.b_iso)
    if guess:
        logger.info("%s: no element columns; elements guessed from the atom names", p)
    return AtomicModel(
        coords=np.asarray(coords, dtype=np.float64).reshape(-1, 3),
        elements=np.asarray(elements, dtype=str),
        atom_names=np.asarray(names, dtype=str),
        residue_names=np.asarray(resn, dtype=str),
        chain_ids=np.asarray(chains, dtype=str),
        segment_ids=np.asarray(segs, dtype=str),
        residue_numbers=np.asarray(resi, dtype=np.int64),
        bfactors=np.asarray(bfac, dtype=np.float64),
        path=p,
        _structure=st,
    )


def write_model_pdb(path: PathLike, model: AtomicModel, coords: npt.ArrayLike) -> None:
    """Write ``model`` as PDB with new coordinates, atomically.

    Parameters
    ----------
    path
        Output ``.pdb``.
    model
        What :func:`read_model` returned (topology, names, B-factors are kept).
    coords
        ``(N, 3)`` new positions in Å, in the order of ``model.coords``.
    """
    xyz = np.asarray(coords, dtype=np.float64)
    if xyz.shape != model.coords.shape:
        raise Z3InputError(
            f"write_model_pdb({path}): coordinates of shape {xyz.shape}, the model has {model.coords.shape}"
        )
    if not np.isfinite(xyz).all():
        raise Z3InputError(f"write_model_pdb({path}): coordinates contain NaN or inf")
    if np.abs(xyz).max(initial=0.0) >= 9999.9995 or xyz.min(initial=0.0) <= -999.9995:
        raise Z3InputError(
            f"write_model_pdb({path}): coordinates outside the PDB range (-999.999…9999.999 Å); write mmCIF instead"
        )
    if model._structure is None:
        raise Z3InputError("write_model_pdb: the model carries no structure (use read_model)")
    st = model._structure.clone()
    i = 0
    for chain in st[0]:
        for residue in chain:
            for atom in residue:
                atom.pos = gemmi.Position(*xyz[i])
                i += 1
    with atomic_path(path) as tmp:
        tmp.write_text(st.make_pdb_string())

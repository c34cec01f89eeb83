"""File input and output of z3: particles, images, maps, coefficients and atomic models.

What lives here (docs/architecture.md): RELION STAR (3.0, 3.1, 4, 5 with optics groups) and cryoSPARC
``.cs`` particle metadata, lazy memory-mapped MRC/MRCS particle stacks, MRC maps, coefficient files
(``.npy``, the Flexutils ``zernikeCoefficients`` STAR column, Xmipp/Flexutils ``z_clnm`` text
files) and atomic models (PDB/mmCIF through gemmi).

Units and conventions are not re-implemented here: they come from :mod:`z3lib.conventions`.
Inside z3 shifts are in pixels and angles are RELION ZYZ Euler angles in degrees; Ångström appear
only in the files. Pixel sizes come from the metadata, never from particle-stack MRC headers.

Every writer is atomic (:func:`atomic_path`): a temporary file in the destination folder is renamed
over the destination only when writing succeeded. Nothing here ever unpickles a file.

The modules, each importing only those above it in this list:

``_common``
    :class:`Z3InputError`, atomic writes, ``.npz``/tab-separated/text/bytes files, small helpers,
    the canonical particle table's columns.
``mrc``
    MRC maps (:func:`read_map`, :func:`write_map`).
``stack``
    Particle image stacks: :class:`ImageStack` (memory-mapped reading), :func:`write_stack`,
    :func:`open_stack_writer`, finding the stacks that metadata names.
``coefficients``
    Coefficient ``.npy`` files, the ``zernikeCoefficients`` column, ``z_clnm`` text files.
``relion``
    STAR blocks (:func:`read_star_blocks`) and STAR writing (:func:`write_star`,
    :func:`write_particles_star`).
``cryosparc``
    The ``.cs`` reader and writer (:func:`write_cs`).
``particles``
    :class:`Particles`, :func:`read_particles` (RELION STAR reader and dispatch),
    :func:`apply_poses`, :func:`particle_identity`.
``xmipp``
    Xmipp ``.xmd`` metadata (:func:`write_xmipp_particles`).
``models``
    Atomic models (:func:`read_model`, :func:`write_model_pdb`).

Importing :mod:`z3lib.io` does not import torch (nor does :mod:`z3lib.conventions`, which the
functions that use it import when they run).
"""

from __future__ import annotations

from z3lib.io._common import (
    TABLE_COLUMNS,
    PathLike,
    Z3InputError,
    atomic_path,
    copy_file,
    read_npz,
    read_table,
    release_memory,
    write_bytes,
    write_npz,
    write_table,
    write_text,
)
from z3lib.io._common import _count_terms as _count_terms  # used by the tests
from z3lib.io.coefficients import (
    ZERNIKE_BLOCK,
    ZERNIKE_COLUMN,
    CoefficientFile,
    FieldRows,
    coefficient_file_shape,
    format_coefficient_column,
    open_coefficient_writer,
    parse_coefficient_column,
    read_coefficients,
    read_zernike_file,
    write_coefficients,
    write_zernike_file,
)
from z3lib.io.cryosparc import write_cs
from z3lib.io.models import AtomicModel, read_model, write_model_pdb
from z3lib.io.mrc import MapData, read_map, write_map
from z3lib.io.particles import (
    POSE_COLUMNS,
    Particles,
    apply_poses,
    particle_identity,
    read_particles,
)
from z3lib.io.relion import read_star_blocks, write_particles_star, write_star
from z3lib.io.stack import ImageStack, open_stack_writer, write_stack
from z3lib.io.xmipp import write_xmipp_particles

__all__ = [
    "POSE_COLUMNS",
    "TABLE_COLUMNS",
    "ZERNIKE_BLOCK",
    "ZERNIKE_COLUMN",
    "AtomicModel",
    "ImageStack",
    "MapData",
    "Particles",
    "PathLike",
    "Z3InputError",
    "apply_poses",
    "atomic_path",
    "copy_file",
    "format_coefficient_column",
    "open_stack_writer",
    "parse_coefficient_column",
    "particle_identity",
    "read_coefficients",
    "CoefficientFile",
    "FieldRows",
    "coefficient_file_shape",
    "open_coefficient_writer",
    "read_map",
    "read_model",
    "read_npz",
    "read_particles",
    "read_star_blocks",
    "read_table",
    "read_zernike_file",
    "release_memory",
    "write_bytes",
    "write_coefficients",
    "write_cs",
    "write_map",
    "write_model_pdb",
    "write_npz",
    "write_particles_star",
    "write_stack",
    "write_star",
    "write_table",
    "write_text",
    "write_xmipp_particles",
    "write_zernike_file",
]

"""The records the report's steps pass to each other (frozen dataclasses).

:class:`ReportInputs` is what :func:`z3lib.report.make_report` is given (paths and settings);
:class:`ReportData` what the steps load from those files; :class:`Landscape`,
:class:`ClusterSet`, :class:`MotionSeries`, :class:`Reconstruction` and
:class:`RefinementRounds` what they compute or write, in pipeline order.

Records that hold arrays compare by identity (``eq=False``): an element-wise ``==`` of arrays has
no truth value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from z3lib import analysis as an
from z3lib import zernike as zk
from z3lib.io import AtomicModel, Particles, write_map


@dataclass(frozen=True)
class ReportInputs:
    """Every input of one report: the parameters of :func:`z3lib.report.make_report`.

    Paths are kept as given (the error messages name them so).

    Attributes
    ----------
    out_dir
        ``results/<run>/report/``, made when missing.
    particles
        The refine stage's STAR (the input STAR with the Zernike3D columns).
    coefficients
        The refine stage's ``(n, 3K)`` coefficients (``.npy``), px of the original box.
    points, reference, mask
        The final round's point cloud (``.npz`` with ``box``, ``original_box``, ``pixel_size``,
        ``original_pixel_size``; they set the units), reference map and mask at the processing
        box: the preprocess stage's in round 1, else those made from the previous round's
        corrected map. The motion and cluster maps are this reference deformed by the fields.
    corrected, uncorrected, fsc
        The ZART maps (MRC) and ``fsc.tsv``.
    zernike
        The config's ``zernike`` section (``L1``, ``L2``, ``basis``): the basis of the coefficients.
    clusters
        k of k-means (capped at the number of particles).
    motion_steps
        Maps (and models) per principal-motion series, from −2σ to +2σ.
    use_umap
        Compute the UMAP landscape (skipped, with a logged reason, below 15 particles).
    model
        Optional atomic model (PDB/mmCIF) in the frame of the original map (Å); with it, model
        series along the motions and one model per cluster are written (PDB).
    model_origin
        ``(3,)`` position (Å) of voxel ``[0, 0, 0]`` of the original map, in the model's frame.
    ground_truth
        Optional ``ground_truth.tsv`` of simulated data (column ``t``): adds a landscape panel
        coloured by the true motion coordinate and its Spearman correlation with PC1.
    benchmarks
        ``benchmarks/<run>/`` (Snakemake benchmark files); None: no timings.
    run_config
        The run's configuration (shown as JSON), or None.
    run_name
        The run's name (page title and ChimeraX script titles); ``""``: none.
    seed
        Seed of k-means and UMAP.
    pixel_size, image_root
        Overrides for :func:`z3lib.io.read_particles` (Å/px; folder of the stacks).
    round_fsc, round_coefficients
        Every refinement round's ``fsc.tsv`` and ``coefficients.npy``, round 1 first; empty:
        one round, ``fsc`` and ``coefficients``.
    gold_standard
        ``shared`` or ``independent`` (each half set with its own networks and refinement):
        stated in the report.
    compare_fsc
        Optional ``fsc.tsv`` of another run of the same particles (for instance the
        ``gold_standard: shared`` run beside an ``independent`` one): its corrected-map FSC is
        drawn beside this run's and the differences in FSC area and resolution are tabulated.
    source_particles
        The run's input particle file (config ``particles``); when it is a cryoSPARC ``.cs``, each
        cluster's ``.cs`` holds its rows with every field. None: the ``.cs`` files are built from
        the refine STAR.
    """

    out_dir: Path
    particles: str | Path
    coefficients: str | Path
    points: str | Path
    reference: str | Path
    mask: str | Path
    corrected: str | Path
    uncorrected: str | Path
    fsc: str | Path
    zernike: Mapping[str, Any]
    clusters: int = 3
    motion_steps: int = 5
    use_umap: bool = True
    model: str | Path | None = None
    model_origin: Sequence[float] = (0.0, 0.0, 0.0)
    ground_truth: str | Path | None = None
    benchmarks: str | Path | None = None
    run_config: Mapping[str, Any] | None = None
    run_name: str = ""
    seed: int = 0
    pixel_size: float | None = None
    image_root: str | Path | None = None
    round_fsc: Sequence[str | Path] = ()
    round_coefficients: Sequence[str | Path] = ()
    gold_standard: str = "shared"
    compare_fsc: str | Path | None = None
    source_particles: str | Path | None = None


@dataclass(frozen=True, eq=False)
class ReportData:
    """The particles, fields and maps the report is made of, loaded and checked.

    Attributes
    ----------
    particles
        The refine STAR's particles (``n`` rows, STAR order).
    coefficients
        ``(n, 3K)`` float64 coefficients, px of the original box (``Rmax`` = original box / 2).
    points
        ``(P, 3)`` point cloud of the reference (px of the processing box, from its centre).
    spec
        Zernike3D basis of the coefficients, on the original box (the STAR's ``data_zernike3d``).
    box
        Processing box (px); :attr:`original_box` is ``spec.box``.
    pixel_size, original_pixel_size
        Their pixel sizes (Å/px).
    reference, mask
        ``(box, box, box)`` reference map and mask (mask > 0.5 inside).
    origin
        ``(3,)`` MRC origin (Å) of the maps written, which puts their centre on the original
        box's centre.
    contour_level
        Surface level of the ChimeraX scripts: the median of the reference inside the mask
        (map units).
    """

    particles: Particles
    coefficients: npt.NDArray[np.float64]
    points: np.ndarray
    spec: zk.ZernikeSpec
    box: int
    pixel_size: float
    original_pixel_size: float
    reference: np.ndarray
    mask: np.ndarray
    origin: tuple[float, float, float]
    contour_level: float

    @property
    def n(self) -> int:
        """Number of particles."""
        return len(self.particles)

    @property
    def original_box(self) -> int:
        """Original box (px), the box of the coefficients."""
        return self.spec.box

    @property
    def processing_spec(self) -> zk.ZernikeSpec:
        """The basis on the processing box (that of :attr:`points`, :attr:`reference` and :attr:`mask`)."""
        return self.spec.rescaled(self.box)

    def processing(self, coefficients: npt.ArrayLike) -> np.ndarray:
        """Rescale ``(..., 3K)`` coefficients in px of the original box to the processing box."""
        rescaled: np.ndarray = self.spec.convert(np.asarray(coefficients, dtype=np.float64), self.processing_spec)
        return rescaled

    def deformation_rms(self, coefficients: npt.ArrayLike) -> np.ndarray:
        """Return the ``(m,)`` RMS of |d| (px of the processing box) over the point cloud.

        ``coefficients`` are ``(m, 3K)`` px of the original box.
        """
        return an.deformation_rms(self.processing(coefficients), self.points, self.processing_spec)

    def deform_reference(self, coefficients: npt.ArrayLike) -> np.ndarray:
        """Return the ``(m, box, box, box)`` reference deformed by each of ``(m, 3K)`` fields.

        The fields are in px of the original box.
        """
        return an.deform_maps(self.reference, self.processing(coefficients), self.mask, self.processing_spec)

    def deform_model(self, model: AtomicModel, coefficients: npt.ArrayLike, origin: Sequence[float]) -> np.ndarray:
        """Move the atoms of ``model`` by a ``(3K,)`` field (px of the original box): ``(N, 3)`` Å.

        ``origin`` is the position (Å) of voxel ``[0, 0, 0]`` of the original map.
        """
        return an.deform_model(model.coords, coefficients, self.spec, self.original_pixel_size, origin=origin)

    def write_map(self, path: Path, volume: np.ndarray) -> None:
        """Write a ``(box, box, box)`` map at the processing pixel size and :attr:`origin`."""
        write_map(path, volume, self.pixel_size, origin=self.origin)


@dataclass(frozen=True, eq=False)
class Landscape:
    """The conformational landscape of the particles.

    Attributes
    ----------
    pca
        PCA of the ``(n, 3K)`` coefficients (scores in px of the original box).
    umap
        ``(n, 2)`` UMAP coordinates, or None when not computed.
    umap_note
        Why UMAP was not computed (``""`` when it was).
    labels
        ``(n,)`` k-means cluster per particle, ``0…k−1``, numbered by increasing mean PC1 score.
    k
        Number of clusters.
    rms_px, rms_a
        ``(n,)`` RMS deformation over the point cloud, px of the processing box and Å.
    truth
        ``(n,)`` true motion coordinate of simulated data, or None.
    """

    pca: an.PcaResult
    umap: np.ndarray | None
    umap_note: str
    labels: npt.NDArray[np.int64]
    k: int
    rms_px: np.ndarray
    rms_a: np.ndarray
    truth: np.ndarray | None


@dataclass(frozen=True)
class ClusterSet:
    """The files written per k-means cluster.

    Attributes
    ----------
    files
        Per cluster (``k`` entries): kind (``star``, ``mrc``, ``pdb`` with a model) → path.
    script
        ``clusters/clusters.cxc``.
    written
        Output name (``cluster_NN_<kind>``, ``clusters_cxc``) → path, in writing order.
    """

    files: tuple[Mapping[str, Path], ...]
    script: Path
    written: Mapping[str, Path]


@dataclass(frozen=True, eq=False)
class MotionSeries:
    """The reference (and model) deformed along one principal component.

    Attributes
    ----------
    name
        ``PC1`` or ``PC2``.
    maps
        ``(steps, box, box, box)`` deformed reference maps.
    sigmas
        ``(steps,)`` positions along the component, in its standard deviations (−2…+2).
    script
        The ChimeraX movie script ``motion/motion_pcN.cxc``.
    map_names, model_names
        File names (in ``motion/``) of the maps and models (no models without an atomic model).
    landscape_xy
        ``(steps, 2)`` positions of the series in the PC1/PC2 plane (px of the original box).
    written
        Output name (``motion_pcN_MM_mrc``, ``..._pdb``, ``motion_pcN_cxc``) → path, in writing
        order.
    """

    name: str
    maps: np.ndarray
    sigmas: np.ndarray
    script: Path
    map_names: tuple[str, ...]
    model_names: tuple[str, ...]
    landscape_xy: np.ndarray
    written: Mapping[str, Path]


@dataclass(frozen=True, eq=False)
class Reconstruction:
    """The ZART reconstructions.

    Attributes
    ----------
    fsc
        ``fsc.tsv``: ``shell``, ``frequency`` (1/Å), ``resolution`` (Å), ``fsc_corrected``,
        ``fsc_uncorrected``.
    summary
        ``corrected``/``uncorrected`` → ``fsc_0.143``/``fsc_0.5`` → resolution (Å).
    corrected, uncorrected
        ``(box, box, box)`` maps.
    compared
        The other run's ``fsc.tsv`` (:attr:`ReportInputs.compare_fsc`), or None.
    comparison
        With :attr:`compared`: rows ``this run``, the other run and ``difference``; columns FSC
        area and the 0.143 and 0.5 resolutions (Å) of the corrected maps.
    """

    fsc: pd.DataFrame
    summary: Mapping[str, Mapping[str, float]]
    corrected: np.ndarray
    uncorrected: np.ndarray
    compared: pd.DataFrame | None = None
    comparison: pd.DataFrame | None = None


@dataclass(frozen=True, eq=False)
class RefinementRounds:
    """Every refinement round.

    Attributes
    ----------
    table
        One row per round (:func:`z3lib.report.summarise_rounds`).
    coefficients
        Per round, round 1 first: ``(n, 3K)`` refined coefficients (px of the original box).
    """

    table: pd.DataFrame
    coefficients: tuple[np.ndarray, ...]

"""The Zernike3D deformation basis: index set, evaluation, fields, fitting and rescaling.

Two bases share one index set and ordering (docs/algorithms.md §1):

``"xmipp"``
    The functions used by Xmipp/Flexutils, so that coefficients interoperate:
    ``Z_k(x) = R_{l1}^{l2}(r) · r^{l2} · Y_{l2}^m(x̂)`` with ``x̃ = x / Rmax`` and ``r = |x̃|``, the
    real spherical harmonics without Condon–Shortley phase (m < 0 sine type), the hand-rounded
    radial tables for l1 = 6…10, and the l2 = 4, m = 0 quirk (ρ² replaced by 1). Defined for
    L2 ≤ 4 and L1 ≤ 15; the original constants beyond are unknown, so asking for more is an error.
``"orthonormal"``
    True 3D Zernike functions ``R_{l1}^{l2}(r) · Y_{l2}^m(x̂)``, orthonormal on the unit ball
    (``∫_ball Z_a Z_b dV = δ_ab``), any degree.

Both vanish outside the unit ball (|x̃| > 1): such points are not deformed (Flexutils' choice).

:class:`ZernikeSpec` is the basis as one value (degrees, basis, box; ``Rmax = box / 2``): the stages,
the decoder and the files pass it around instead of loose degrees, radius and basis. Coefficient
files live in :mod:`z3lib.io` (which imports this module, never the reverse).

Coefficient vectors are laid out ``[c_x(K), c_y(K), c_z(K)]`` and are in pixels of the box in which
``Rmax`` is given. The field is ``d(x) = Σ_k c_k Z_k(x / Rmax)`` and the mapping is push:
a reference point ``x`` moves to ``x + d(x)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt

from z3lib.arrays import is_tensor
from z3lib.conventions import default_rmax

Basis = Literal["xmipp", "orthonormal"]
BASES: tuple[str, ...] = ("xmipp", "orthonormal")

#: Highest angular degree for which the xmipp functions are known exactly.
XMIPP_MAX_L2 = 4
#: Highest radial degree of the xmipp tables.
XMIPP_MAX_L1 = 15

# Xmipp's hand-rounded radial tables for l1 = 6…10: coefficients of r^{l1}, r^{l1-2}, …, r^{l2}
# (docs/algorithms.md §1.4). Every other degree equals the closed form.
_XMIPP_ROUNDED_RADIALS: dict[tuple[int, int], tuple[float, ...]] = {
    (6, 0): (103.8, -167.7, 76.25, -8.472),
    (6, 2): (69.23, -95.86, 30.5),
    (6, 4): (25.17, -21.3),
    (6, 6): (3.873,),
    (7, 1): (184.3, -331.7, 178.6, -27.06),
    (7, 3): (100.5, -147.4, 51.02),
    (7, 5): (30.92, -26.8),
    (7, 7): (4.123,),
    (8, 0): (413.9, -876.5, 613.6, -157.3, 10.73),
    (8, 2): (301.0, -584.4, 350.6, -62.93),
    (8, 4): (138.9, -212.5, 77.92),
    (8, 6): (37.05, -32.69),
    (8, 8): (4.359,),
    (9, 1): (751.6, -1741.0, 1382.0, -430.0, 41.35),
    (9, 3): (462.6, -949.5, 614.4, -122.9),
    (9, 5): (185.0, -292.1, 111.7),
    (9, 7): (43.53, -38.95),
    (9, 9): (4.583,),
    (10, 0): (1652.0, -4326.0, 4099.0, -1688.0, 281.3, -12.98),
    (10, 2): (1271.0, -3147.0, 2732.0, -964.4, 112.5),
    (10, 4): (677.7, -1452.0, 993.6, -214.3),
    (10, 6): (239.2, -387.3, 152.9),
    (10, 8): (50.36, -45.56),
    (10, 10): (4.796,),
}


# ----------------------------------------------------------------------------------------------
# Index set
# ----------------------------------------------------------------------------------------------
def _check_degrees(l1_max: int, l2_max: int) -> None:
    if int(l1_max) != l1_max or int(l2_max) != l2_max or l1_max < 0 or l2_max < 0:
        raise ValueError(f"Zernike3D degrees must be non-negative integers, got L1={l1_max}, L2={l2_max}")
    if l2_max > l1_max:
        raise ValueError(f"Zernike3D degrees need L1 >= L2 (as Scipion requires), got L1={l1_max}, L2={l2_max}")


def count_terms(l1_max: int, l2_max: int) -> int:
    """Count the basis functions per axis, K: ``Σ_{h=0}^{L2} (2h+1)(⌊(L1−h)/2⌋+1)``.

    (3, 2) → 13, (5, 5) → 56, (7, 7) → 120. The coefficient vector has 3K entries.
    """
    _check_degrees(l1_max, l2_max)
    return sum((2 * h + 1) * ((l1_max - h) // 2 + 1) for h in range(l2_max + 1))


@lru_cache(maxsize=64)
def _indices(l1_max: int, l2_max: int) -> np.ndarray:
    rows = [(l1, h, h, m) for h in range(l2_max + 1) for l1 in range(h, l1_max + 1, 2) for m in range(-h, h + 1)]
    out = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    out.setflags(write=False)
    return out


def basis_indices(l1_max: int, l2_max: int) -> np.ndarray:
    """Index table of the Zernike3D basis in the documented order.

    Outer loop ``h = l2 = 0…L2``, middle ``l1 = h, h+2, … ≤ L1``, inner ``m = −h…h``.

    Returns
    -------
    ``(K, 4)`` int64 array of ``(l1, n, l2, m)`` with ``n = l2``.
    """
    _check_degrees(l1_max, l2_max)
    return _indices(int(l1_max), int(l2_max)).copy()


# ----------------------------------------------------------------------------------------------
# Radial and angular parts
# ----------------------------------------------------------------------------------------------
def radial_coefficients(l1: int, l2: int) -> np.ndarray:
    """Closed-form radial polynomial ``R_{l1}^{l2}(r) = r^{l2} Σ_s a_s r^{2s}``.

    ``R = √(2 l1 + 3) r^{l2} P_k^{(0, l2+1/2)}(2r² − 1)``, ``k = (l1 − l2) / 2``; normalised so that
    ``∫_0^1 R² r² dr = 1`` with a positive leading coefficient.

    Returns
    -------
    ``(k + 1,)`` float64 ``a_s`` for ``s = 0…k`` (ascending powers of r²).
    """
    if (l1 - l2) % 2 or l2 > l1 or l2 < 0:
        raise ValueError(f"no radial Zernike polynomial for l1={l1}, l2={l2}")
    k = (l1 - l2) // 2
    b = l2 + 1.5
    norm = math.sqrt(2 * l1 + 3)
    return np.array(
        [
            norm
            * (-1) ** (k + s)
            * math.comb(k, s)
            * math.exp(math.lgamma(b + k + s) - math.lgamma(b + s))
            / math.factorial(k)
            for s in range(k + 1)
        ]
    )


def _xmipp_radial_coefficients(l1: int, l2: int) -> np.ndarray:
    table = _XMIPP_ROUNDED_RADIALS.get((l1, l2))
    if table is None:
        return radial_coefficients(l1, l2)
    return np.asarray(table[::-1], dtype=np.float64)  # table lists descending powers


def _double_factorial(n: int) -> int:
    return math.prod(range(n, 0, -2)) if n > 0 else 1


def _solid_harmonics(x: Any, y: Any, z: Any, l2_max: int, xmipp_quirk: bool) -> dict[tuple[int, int], Any]:
    """Evaluate the real regular solid harmonics ``r^l Y_l^m`` as polynomials in (x, y, z).

    Orthonormal on the sphere, no Condon–Shortley phase, m < 0 sine type; by the Legendre
    recurrence.

    Works at r = 0 and for numpy or torch arrays alike.
    """
    r2 = x * x + y * y + z * z
    cos_m = [x * 0 + 1]
    sin_m = [x * 0]
    for m in range(1, l2_max + 1):
        cos_m.append(x * cos_m[m - 1] - y * sin_m[m - 1])
        sin_m.append(x * sin_m[m - 1] + y * cos_m[m - 1])
    out: dict[tuple[int, int], Any] = {}
    for m in range(l2_max + 1):
        # Π_l^m(z, r²) with r^l P_l^m(cos θ) = Π_l^m · (r sin θ)^m
        pi_prev2 = None
        pi_prev = cos_m[0] * float(_double_factorial(2 * m - 1))
        pis = {m: pi_prev}
        if m + 1 <= l2_max:
            pi_cur = z * float(2 * m + 1) * pi_prev
            pis[m + 1] = pi_cur
            pi_prev2, pi_prev = pi_prev, pi_cur
            for ell in range(m + 2, l2_max + 1):
                pi_cur = (z * float(2 * ell - 1) * pi_prev - r2 * float(ell + m - 1) * pi_prev2) / float(ell - m)
                pis[ell] = pi_cur
                pi_prev2, pi_prev = pi_prev, pi_cur
        for ell, pi_lm in pis.items():
            norm = math.sqrt((2 * ell + 1) / (4 * math.pi) * math.factorial(ell - m) / math.factorial(ell + m))
            if m == 0:
                out[(ell, 0)] = pi_lm * norm
            else:
                norm *= math.sqrt(2.0)
                out[(ell, m)] = pi_lm * cos_m[m] * norm
                out[(ell, -m)] = pi_lm * sin_m[m] * norm
    if xmipp_quirk and l2_max >= 4:
        z2 = z * z
        out[(4, 0)] = (35.0 * z2 * z2 - 30.0 * z2 + 3.0) * math.sqrt(9.0 / (256.0 * math.pi))
    return out


def _check_basis(basis: str, l1_max: int, l2_max: int) -> None:
    if basis not in BASES:
        raise ValueError(f"unknown Zernike3D basis {basis!r}; choose one of {BASES}")
    if basis == "xmipp" and l2_max > XMIPP_MAX_L2:
        raise ValueError(
            f"the 'xmipp' Zernike3D basis is defined only for L2 <= {XMIPP_MAX_L2} (got L2={l2_max}): "
            "beyond that the original Xmipp constants are unknown, so coefficients could not "
            "interoperate anyway. Use basis='orthonormal' (true 3D Zernike functions) for higher degrees."
        )
    if basis == "xmipp" and l1_max > XMIPP_MAX_L1:
        raise ValueError(
            f"the 'xmipp' Zernike3D basis has radial tables up to L1 = {XMIPP_MAX_L1} (got L1={l1_max}); "
            "use basis='orthonormal' for higher degrees."
        )


def evaluate_basis(
    points: Any,
    l1_max: int,
    l2_max: int,
    rmax: float,
    basis: Basis | str = "xmipp",
) -> Any:
    """Evaluate the Zernike3D basis at a point cloud.

    Parameters
    ----------
    points
        ``(N, 3)`` positions ``(x, y, z)`` in pixels relative to the box centre (numpy or torch,
        float32 or float64; any device).
    l1_max, l2_max
        Degrees L1 ≥ L2.
    rmax
        Radius (px) that maps to the unit ball; ``box / 2`` by convention.
    basis
        ``"xmipp"`` (default) or ``"orthonormal"``.

    Returns
    -------
    ``(N, K)`` basis values, same array type, dtype and device as ``points``; zero for points
    outside the ball of radius ``rmax``.
    """
    _check_degrees(l1_max, l2_max)
    _check_basis(basis, l1_max, l2_max)
    is_torch = is_tensor(points)
    if is_torch:
        import torch

        out_dtype = points.dtype if points.is_floating_point() else torch.float32
        p = points.to(torch.float64) / float(rmax)
    else:
        arr = np.asarray(points)
        out_dtype_np = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.dtype(np.float64)
        p = arr.astype(np.float64) / float(rmax)
    if p.ndim != 2 or p.shape[-1] != 3:
        raise ValueError(f"points must be an (N, 3) array of (x, y, z), got shape {tuple(p.shape)}")
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    r2 = x * x + y * y + z * z
    # clamped below: the gradient of r at the centre is then 0, the limit of r^l2·Y's (no NaN)
    r = r2.clamp_min(1e-30).sqrt() if is_torch else np.sqrt(r2)
    inside = r2 <= 1.0
    harmonics = _solid_harmonics(x, y, z, l2_max, xmipp_quirk=(basis == "xmipp"))
    columns = []
    for l1, _, l2, m in _indices(int(l1_max), int(l2_max)):
        coeffs = (
            _xmipp_radial_coefficients(int(l1), int(l2)) if basis == "xmipp" else radial_coefficients(int(l1), int(l2))
        )
        poly = x * 0 + float(coeffs[-1])
        for a in coeffs[-2::-1]:
            poly = poly * r2 + float(a)
        term = poly * harmonics[(int(l2), int(m))]
        if basis == "xmipp":
            term = term * r ** int(l2)
        columns.append(term)
    if is_torch:
        values = torch.stack(columns, dim=-1) * inside[:, None]
        return values.to(out_dtype)
    values_np = np.stack(columns, axis=-1) * inside[:, None]
    return values_np.astype(out_dtype_np)


# ----------------------------------------------------------------------------------------------
# Fields
# ----------------------------------------------------------------------------------------------
def split_axes(coefficients: Any) -> Any:
    """``(..., 3K)`` coefficient vectors → ``(..., 3, K)`` (rows c_x, c_y, c_z)."""
    shape = tuple(coefficients.shape)
    if shape[-1] % 3:
        raise ValueError(f"a Zernike3D coefficient vector has 3K entries, got {shape[-1]}")
    return coefficients.reshape(shape[:-1] + (3, shape[-1] // 3))


def deformation_field(basis_values: Any, coefficients: Any) -> Any:
    """Displacements of a point cloud from coefficients: ``d = Z · c`` per axis.

    Parameters
    ----------
    basis_values
        ``(N, K)`` from :func:`evaluate_basis`.
    coefficients
        ``(..., 3K)`` vectors ``[c_x, c_y, c_z]`` in pixels.

    Returns
    -------
    ``(..., N, 3)`` displacements ``(dx, dy, dz)`` in pixels (numpy or torch, following the inputs).
    """
    c = split_axes(coefficients)
    if c.shape[-1] != basis_values.shape[-1]:
        raise ValueError(f"coefficients have K={c.shape[-1]} per axis but the basis has K={basis_values.shape[-1]}")
    if is_tensor(c):
        import torch

        return torch.einsum("nk,...ak->...na", basis_values.to(c.dtype), c)
    return np.einsum("nk,...ak->...na", basis_values, c)


def fit_coefficients(
    points: npt.ArrayLike,
    displacements: npt.ArrayLike,
    l1_max: int,
    l2_max: int,
    rmax: float,
    basis: Basis | str = "xmipp",
    weights: npt.ArrayLike | None = None,
) -> np.ndarray:
    """Least-squares Zernike3D coefficients of a displacement field sampled at points.

    Minimises ``Σ_i w_i |d_i − Σ_k c_k Z_k(x_i)|²`` independently for each axis.

    Parameters
    ----------
    points
        ``(N, 3)`` positions in px relative to the box centre.
    displacements
        ``(N, 3)`` displacements (px) at those points.
    l1_max, l2_max, basis
        Zernike3D degrees and basis.
    rmax
        Radius (px) of the unit ball.
    weights
        optional ``(N,)`` non-negative weights (e.g. amplitudes).

    Returns
    -------
    ``(3K,)`` float64 ``[c_x, c_y, c_z]`` in pixels.
    """
    pts = np.asarray(points, dtype=np.float64)
    disp = np.asarray(displacements, dtype=np.float64)
    if disp.shape != pts.shape:
        raise ValueError(f"displacements {disp.shape} must match points {pts.shape}")
    z = evaluate_basis(pts, l1_max, l2_max, rmax, basis)
    if weights is not None:
        w = np.sqrt(np.clip(np.asarray(weights, dtype=np.float64), 0, None))[:, None]
        z, disp = z * w, disp * w
    coeffs, *_ = np.linalg.lstsq(z, disp, rcond=None)  # (K, 3)
    return np.ascontiguousarray(coeffs.T).reshape(-1)


def refit_basis(
    coefficients: npt.ArrayLike,
    points: npt.ArrayLike,
    source: ZernikeSpec,
    target: ZernikeSpec,
) -> tuple[np.ndarray, float]:
    """Re-express fields in another basis (or degree set) by least squares on a point cloud.

    One linear map ``M = argmin ||Z_to M − Z_from||`` over the points converts every particle's
    coefficients, per axis; it is exact when the target spans the source field space.

    Parameters
    ----------
    coefficients
        ``(n, 3K_from)`` coefficients of ``source`` (any displacement unit; the result has the
        same unit).
    points
        ``(N, 3)`` positions in px of the specs' box (e.g. the mask voxels).
    source, target
        The two bases, on the same box.

    Returns
    -------
    ``(n, 3K_to)`` coefficients and the relative RMS residual of the refitted fields over all
    particles and points (0 = exact).
    """
    if source.box != target.box:
        raise ValueError(f"refit_basis: the bases are on different boxes ({source.box} and {target.box} px)")
    c = np.asarray(coefficients, dtype=np.float64)
    pts = np.asarray(points, dtype=np.float64)
    z_from = source.evaluate(pts)
    z_to = target.evaluate(pts)
    m, *_ = np.linalg.lstsq(z_to, z_from, rcond=None)  # (K_to, K_from)
    blocks = c.reshape(len(c), 3, z_from.shape[1])
    out = np.einsum("lk,bak->bal", m, blocks)
    field = np.einsum("nk,bak->bna", z_from, blocks)
    err = np.einsum("nl,bal->bna", z_to, out) - field
    norm = float(np.sqrt((field**2).sum()))
    residual = float(np.sqrt((err**2).sum())) / norm if norm > 0 else 0.0
    return out.reshape(len(c), -1), residual


def rescale_coefficients(coefficients: Any, box_from: int, box_to: int) -> Any:
    """Express coefficients estimated at ``box_from`` pixels in pixels of ``box_to``.

    The basis argument ``x / Rmax`` is unchanged when Rmax scales with the box, so only the
    displacement unit changes: ``c · box_to / box_from`` (and Rmax likewise).
    """
    return coefficients * (float(box_to) / float(box_from))


def convert_degrees(
    coefficients: npt.ArrayLike, degrees_from: tuple[int, int], degrees_to: tuple[int, int]
) -> np.ndarray:
    """Map coefficient vectors between degree sets by their ``(l1, l2, m)`` key, per axis block.

    Terms absent from the target set are dropped; new terms are zero. Unlike Flexutils'
    ``adaptZernike3DVector``, every axis block keeps its own values when the set shrinks.

    Parameters
    ----------
    coefficients
        ``(..., 3 K_from)``.
    degrees_from, degrees_to
        Degrees ``(L1, L2)`` of ``coefficients`` and of the result.

    Returns
    -------
    ``(..., 3 K_to)`` float64.
    """
    c = np.asarray(coefficients, dtype=np.float64)
    src = basis_indices(*degrees_from)
    dst = basis_indices(*degrees_to)
    k_from, k_to = len(src), len(dst)
    if c.shape[-1] != 3 * k_from:
        raise ValueError(f"expected 3K = {3 * k_from} coefficients for {degrees_from}, got {c.shape[-1]}")
    where = {(int(a), int(b), int(m)): i for i, (a, _, b, m) in enumerate(src)}
    out = np.zeros(c.shape[:-1] + (3 * k_to,))
    for j, (a, _, b, m) in enumerate(dst):
        i = where.get((int(a), int(b), int(m)))
        if i is None:
            continue
        for axis in range(3):
            out[..., axis * k_to + j] = c[..., axis * k_from + i]
    return out


def deformation_rms(basis_values: Any, coefficients: Any) -> Any:
    """RMS of |d| over the points (px), the ``sphDeformation`` statistic. ``(..., 3K)`` → ``(...)``."""
    d = deformation_field(basis_values, coefficients)
    sq = (d * d).sum(-1).mean(-1)
    return sq.sqrt() if is_tensor(sq) else np.sqrt(sq)


def gram_matrix(basis_values: Any, weights: Any = None) -> Any:
    """Empirical Gram matrix ``G = Zᵀ W Z / Σw`` of the basis over a point cloud, ``(K, K)``.

    ``cᵀ G c`` per axis is the mean squared field — the field energy that a plain coefficient
    norm is not in the (non-orthonormal) xmipp basis.
    """
    if weights is None:
        return basis_values.T @ basis_values / basis_values.shape[0]
    w = weights / weights.sum()
    return (basis_values * w[:, None]).T @ basis_values


# ----------------------------------------------------------------------------------------------
# The basis as one value
# ----------------------------------------------------------------------------------------------
#: Keys of the STAR ``data_zernike3d`` block, in file order.
BLOCK_KEYS: tuple[str, ...] = ("L1", "L2", "Rmax", "basis", "box")


@dataclass(frozen=True)
class ZernikeSpec:
    """A Zernike3D basis on a box: degrees, basis and the box its coefficients are in.

    Degrees ``L1 >= L2``, ``basis`` and the ``box`` (px) whose coefficients it describes, with
    ``Rmax = box / 2`` (docs/conventions.md). Coefficients of this spec are ``(..., 3K)`` px of
    ``box``, layout ``[c_x, c_y, c_z]``; point clouds are ``(N, 3)`` px of ``box`` relative to its
    centre. Invalid degrees, an unknown basis or a degree the xmipp basis does not define raise
    ``ValueError`` at construction.
    """

    L1: int
    L2: int
    basis: Basis
    box: int

    def __post_init__(self) -> None:
        for name in ("L1", "L2", "box"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value:
                raise ValueError(f"ZernikeSpec.{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        _check_degrees(self.L1, self.L2)
        _check_basis(self.basis, self.L1, self.L2)
        if self.box < 2:
            raise ValueError(f"ZernikeSpec.box must be at least 2 px, got {self.box}")

    @classmethod
    def from_config(cls, zernike: Mapping[str, Any], box: int) -> ZernikeSpec:
        """Build the spec of a config's ``zernike`` section (keys ``L1``, ``L2``, ``basis``) on ``box`` px."""
        missing = [key for key in ("L1", "L2", "basis") if key not in zernike]
        if missing:
            raise ValueError(f"the zernike settings need the keys L1, L2 and basis; missing {', '.join(missing)}")
        return cls(int(zernike["L1"]), int(zernike["L2"]), cast(Basis, str(zernike["basis"])), int(box))

    @classmethod
    def from_block(cls, block: Mapping[str, Any]) -> ZernikeSpec:
        """Read the spec of a STAR ``data_zernike3d`` block (``L1``, ``L2``, ``Rmax``, ``basis``, ``box``).

        ``ValueError`` names a missing key, and an ``Rmax`` other than ``box / 2`` (the only radius
        this project writes or reads: the fields would be evaluated on another ball).
        """
        missing = [key for key in BLOCK_KEYS if key not in block]
        if missing:
            raise ValueError(
                f"a data_zernike3d block needs the keys {', '.join(BLOCK_KEYS)}; missing {', '.join(missing)}"
            )
        spec = cls(int(block["L1"]), int(block["L2"]), cast(Basis, str(block["basis"])), int(block["box"]))
        if not math.isclose(float(block["Rmax"]), spec.rmax, rel_tol=1e-6):
            raise ValueError(
                f"a data_zernike3d block with Rmax {block['Rmax']} px for box {spec.box} px: "
                f"coefficients here always use Rmax = box / 2 = {spec.rmax:g} px"
            )
        return spec

    @property
    def degrees(self) -> tuple[int, int]:
        """``(L1, L2)``."""
        return self.L1, self.L2

    @property
    def rmax(self) -> float:
        """Radius (px of ``box``) of the ball that maps to the unit ball: ``box / 2`` (the convention)."""
        return default_rmax(self.box)

    @property
    def n_terms(self) -> int:
        """K, basis functions per axis."""
        return count_terms(self.L1, self.L2)

    @property
    def n_coefficients(self) -> int:
        """3K, the length of one coefficient vector."""
        return 3 * self.n_terms

    def indices(self) -> np.ndarray:
        """Return the ``(K, 4)`` int64 ``(l1, n, l2, m)`` of the basis functions (:func:`basis_indices`)."""
        return basis_indices(self.L1, self.L2)

    def evaluate(self, points: Any) -> Any:
        """Evaluate the ``(N, K)`` basis values at ``(N, 3)`` points (px of ``box``; numpy or torch alike)."""
        return evaluate_basis(points, self.L1, self.L2, self.rmax, self.basis)

    def fit(
        self, points: npt.ArrayLike, displacements: npt.ArrayLike, weights: npt.ArrayLike | None = None
    ) -> np.ndarray:
        """Fit ``(3K,)`` least-squares coefficients (px) to displacements (:func:`fit_coefficients`).

        Parameters
        ----------
        points
            ``(N, 3)`` px of ``box`` relative to its centre.
        displacements
            ``(N, 3)`` px at those points.
        weights
            Optional ``(N,)`` non-negative weights.
        """
        return fit_coefficients(points, displacements, self.L1, self.L2, self.rmax, self.basis, weights)

    def rescaled(self, box: int) -> ZernikeSpec:
        """Return the same basis on another box (``Rmax`` follows it)."""
        return ZernikeSpec(self.L1, self.L2, self.basis, int(box))

    def convert(self, coefficients: Any, to: ZernikeSpec) -> Any:
        """Express coefficients ``(..., 3K)`` of this spec in px of ``to``'s box (the same field).

        Only the box may differ: another degree set or basis is a refit (:func:`refit_basis`).
        """
        if (to.L1, to.L2, to.basis) != (self.L1, self.L2, self.basis):
            raise ValueError(
                f"cannot convert coefficients of {self} to {to} by rescaling: the degrees or the "
                "basis differ (use refit_basis)"
            )
        return rescale_coefficients(coefficients, self.box, to.box)

    def check(self, coefficients: Any, what: str = "coefficients") -> None:
        """Raise ``ValueError`` unless ``coefficients`` is ``(..., 3K)`` for this spec (``what`` names them)."""
        width = int(coefficients.shape[-1]) if getattr(coefficients, "ndim", 0) else -1
        if width != self.n_coefficients:
            raise ValueError(
                f"{what}: shape {tuple(getattr(coefficients, 'shape', ()))}, but (L1, L2) = "
                f"({self.L1}, {self.L2}) needs 3K = {self.n_coefficients} per vector"
            )

    def to_block(self) -> dict[str, Any]:
        """Return the STAR ``data_zernike3d`` block: ``L1``, ``L2``, ``Rmax`` (px of ``box``), ``basis``, ``box``."""
        return {"L1": self.L1, "L2": self.L2, "Rmax": self.rmax, "basis": self.basis, "box": self.box}

    def __str__(self) -> str:
        return f"(L1, L2) = ({self.L1}, {self.L2}) {self.basis} on box {self.box}"

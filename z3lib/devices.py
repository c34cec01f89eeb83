"""Choose devices, in one place: the torch device and the ZART back end.

The torch device is the network's and the refinement's; the ZART back end is cupy on a CUDA GPU,
or numpy on the CPU.

Importing this module imports neither torch nor cupy; each check imports what it asks about.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

ZartBackendName = Literal["numpy", "cupy"]


def select_device(want_gpu: bool, log: logging.Logger | None = None) -> torch.device:
    """``cuda`` when a GPU was requested and one is usable, else ``cpu`` (and the log says why)."""
    import torch

    logger = log or logging.getLogger(__name__)
    if want_gpu and torch.cuda.is_available():
        dev = torch.device("cuda")
        logger.info("running on the GPU: %s", torch.cuda.get_device_name(dev))
        return dev
    if want_gpu:
        logger.info("no usable CUDA GPU on this machine: running on the CPU (%d threads)", torch.get_num_threads())
    else:
        logger.info("running on the CPU (%d threads)", torch.get_num_threads())
    return torch.device("cpu")


def cupy_usable() -> bool:
    """Tell whether cupy imports *and* can run a kernel on a CUDA device (importing is not enough)."""
    try:
        import cupy

        return bool(int(cupy.asnumpy(cupy.arange(3, dtype=cupy.float32).sum())) == 3)
    except Exception:  # noqa: BLE001 - no driver, no device, no compiler: all mean "not usable"
        return False


def cupy_device_name() -> str:
    """Name of the current CUDA device as cupy sees it (e.g. ``NVIDIA H200``)."""
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def zart_backend_for_job(name: str, *, gpu_slot: bool) -> str:
    """Return the ZART back end a workflow job asks for.

    ``"auto"`` means ``"numpy"`` in a job that holds no GPU slot (``resources.gpu``); any other name
    is passed on as it is.
    """
    if not gpu_slot and name == "auto":
        return "numpy"  # this job holds no GPU slot
    return name


def choose_zart_backend(name: str = "auto") -> ZartBackendName:
    """Return the ZART back end that runs for ``name``.

    ``"auto"`` (cupy when a GPU is usable, else numpy), ``"numpy"`` or ``"cupy"`` (an error when no
    usable CUDA device/cupy is found).
    """
    if name not in ("auto", "numpy", "cupy"):
        raise ValueError(f"unknown ZART back end {name!r}; use 'auto', 'numpy' or 'cupy'")
    if name == "cupy" or (name == "auto" and cupy_usable()):
        if name == "cupy" and not cupy_usable():
            raise RuntimeError(
                "the cupy ZART back end was asked for but no usable CUDA device/cupy was found; "
                "use backend 'numpy' or 'auto'"
            )
        return "cupy"
    return "numpy"

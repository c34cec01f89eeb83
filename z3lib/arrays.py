"""Numpy-or-torch arrays, told apart without importing torch.

The convention, basis and CTF functions accept numpy arrays and torch tensors alike and follow
their input; they import torch only for a torch input, so that importing them does not import
torch (:mod:`z3lib.io`, :mod:`z3lib.conventions`, :mod:`z3lib.zernike`, :mod:`z3lib.ctf`).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TypeGuard

if TYPE_CHECKING:
    import torch


def is_tensor(value: Any) -> TypeGuard[torch.Tensor]:
    """Tell whether ``value`` is a ``torch.Tensor``, without importing torch.

    A value can only be a tensor once torch has been imported.
    """
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)

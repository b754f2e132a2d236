"""meprop-triton: meProp (minimal-effort back-propagation) as a drop-in part of PyTorch.

``MePropLinear`` / ``meprop_linear`` compute the ordinary linear forward pass and, in
backward, keep only the top-k output units by gradient magnitude, so the backward GEMMs
shrink from ``out`` to ``k`` rows. ``convert`` swaps the ``nn.Linear`` layers of a model;
``Simplifier`` prunes seldom-selected units and shrinks the layers for good (meSimp).

Importing this package never initialises CUDA and never needs a GPU.
"""

from .convert import convert
from .functional import meprop_linear
from .nn import MePropLinear, MePropLSTM, SelectionStats
from .simplify import Simplifier
from .utils import clip_grad_norm_, keep_freed_memory

__version__ = "0.1.0"

__all__ = [
    "MePropLinear",
    "MePropLSTM",
    "meprop_linear",
    "convert",
    "Simplifier",
    "SelectionStats",
    "clip_grad_norm_",
    "keep_freed_memory",
    "__version__",
]

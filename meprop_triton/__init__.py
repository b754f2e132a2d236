"""meprop-triton: meProp (minimal-effort back-propagation) as a drop-in part of PyTorch.

``MePropLinear`` / ``meprop_linear`` compute the ordinary linear forward pass and, in
backward, keep only the top-k output units by gradient magnitude, so the backward GEMMs
shrink from ``out`` to ``k`` rows. ``convert`` swaps the ``nn.Linear`` layers of a model
(and transformers' ``Conv1D``, as ``MePropConv1D``);
``Simplifier`` prunes seldom-selected units and shrinks the layers for good (meSimp).

Importing this package never initialises CUDA and never needs a GPU.
"""

from .conv1d import MePropConv1D, meprop_conv1d
from .convert import ConversionReport, apply_settings, convert, meprop_settings
from .functional import meprop_linear
from .nn import MePropLinear, MePropLSTM, SelectionStats
from .simplify import Simplifier
from .utils import clip_grad_norm_, flush_denormals, keep_freed_memory

__version__ = "0.1.0"

__all__ = [
    "MePropLinear",
    "MePropLSTM",
    "meprop_linear",
    "convert",
    "ConversionReport",
    "meprop_settings",
    "apply_settings",
    "MePropConv1D",
    "meprop_conv1d",
    "Simplifier",
    "SelectionStats",
    "clip_grad_norm_",
    "flush_denormals",
    "keep_freed_memory",
    "__version__",
]

"""Generated cases of ``meprop_linear(backend="triton")`` against the definition.

The same cases and checks as tests/test_properties.py (see tests/properties.py), on the
Triton kernels: through the interpreter on CPU machines, on CUDA tensors on a GPU.
fp32, fp16 and bf16 (in the interpreter with its ``tl.dot`` mended for bf16, see
``kernel_checks._emulate_bf16_dot``), dense gradients (the only kind the Triton backend
gives). 60 cases, derandomized.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from properties import cases, check_case  # noqa: E402

import kernel_checks  # noqa: E402

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if kernel_checks.BF16_DOT else [])


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases(dtypes=DTYPES, sparse=False, max_dim=40))
def test_triton_path_matches_the_definition(case, device):
    check_case(case, backend="triton", device=device, in_round=kernel_checks.tf32_round(case["dtype"]))

"""Generated cases of ``meprop_linear`` on the torch path against the definition.

See tests/properties.py for what one case covers and how it is checked. 240 cases,
derandomized: the same cases on every run.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings

from properties import cases, check_case


@settings(max_examples=240, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(dtypes=[torch.float32, torch.float64, torch.bfloat16]))
def test_torch_path_matches_the_definition(case):
    check_case(case, backend="torch")

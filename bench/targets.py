"""Speed targets as data: every case that has one records it, and whether it was met.

A case calls :func:`check_targets` once, after timing, with its targets and the values it
measured. The result lands in ``benchmark.extra_info``:

* ``target``: ``{"metric": "speedup_vs_dense", "least": 2.0, "value": 2.31, "met": true}``
  (``"most"`` for an upper bound, e.g. ``overhead_us``); a list of such dicts where a case
  has several targets;
* ``target_met``: true when every target of the case is met.

An unmet target fails the test only under ``--assert-targets`` (``bench/conftest.py``);
otherwise a ``--benchmark-only`` run fails only when a case breaks, and the unmet targets
are listed at the end of the run (``UNMET``) and marked NOT MET in ``bench/report.py``'s
table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: the option that turns an unmet target into a failure
ASSERT_OPTION = "assert_targets"

#: "<test id>: <message>" of every unmet target of this run, for the terminal summary
UNMET: list[str] = []


@dataclass(frozen=True)
class Target:
    """``metric`` must reach at least ``least`` or at most ``most`` (exactly one given)."""

    metric: str
    least: float | None = None
    most: float | None = None

    def __post_init__(self):
        if (self.least is None) == (self.most is None):
            raise ValueError(f"target on {self.metric!r}: give exactly one of least= and most=")

    def met_by(self, value) -> bool:
        if value is None or not math.isfinite(value):
            return False  # nothing measured, or NaN: not met
        return value >= self.least if self.least is not None else value <= self.most

    def describe(self) -> str:
        return f"{self.metric} >= {self.least:g}" if self.least is not None else f"{self.metric} <= {self.most:g}"

    def as_dict(self) -> dict:
        bound = {"least": self.least} if self.least is not None else {"most": self.most}
        return {"metric": self.metric, **bound}


def assert_targets(config) -> bool:
    """Whether unmet targets fail the run (``--assert-targets``). False where the option is
    not registered (a run that did not load ``bench/conftest.py``)."""
    if config is None:
        return False
    try:
        return bool(config.getoption(ASSERT_OPTION))
    except ValueError:
        return False


def check_targets(benchmark, config, targets, values: dict, *, context: str = "") -> bool:
    """Record ``targets`` (a :class:`Target` or a list of them) and whether ``values``
    (metric name -> measured value) meets each, in ``benchmark.extra_info``.

    Returns True when all are met. An unmet target is added to :data:`UNMET`; it raises
    ``AssertionError`` (failing the test) only when ``config`` has ``--assert-targets``.
    ``context`` (e.g. "meProp 0.42 ms vs dense 2.1 ms") goes into the message.
    """
    targets = [targets] if isinstance(targets, Target) else list(targets)
    if not targets:
        raise ValueError("check_targets needs at least one target")
    records, failures = [], []
    for t in targets:
        if t.metric not in values:
            raise KeyError(f"no measured value for the target's metric {t.metric!r}; have {sorted(values)}")
        value = values[t.metric]
        met = t.met_by(value)
        records.append({**t.as_dict(), "value": value, "met": met})
        if not met:
            shown = "nothing measured" if value is None else f"{value:.4g}"
            failures.append(f"{t.metric} = {shown}, target {t.describe()}")
    all_met = not failures
    benchmark.extra_info["target"] = records if len(records) > 1 else records[0]
    benchmark.extra_info["target_met"] = all_met
    if failures:
        name = getattr(benchmark, "name", None) or "benchmark"
        message = "; ".join(failures) + (f" ({context})" if context else "")
        UNMET.append(f"{name}: {message}")
        if assert_targets(config):
            raise AssertionError(f"target not met: {message}")
    return all_met


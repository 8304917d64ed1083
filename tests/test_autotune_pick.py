"""The autotune's timing loop (ct3d_fx/_cuda.py ``_pick_fastest``) with a fake timer, on the CPU:
candidates warmed up, then timed in interleaved rounds, the lowest median wins, ties go to the
earlier candidate. tests/test_cuda_autotune.py runs it with CUDA events."""
from __future__ import annotations

import pytest

from ct3d_fx import _cuda


def _cands(log):
    return [(name, (lambda n=name: log.append(n))) for name in ("fused", "reference", "cl")]


def test_candidates_are_warmed_up_then_timed_in_interleaved_rounds():
    log = []

    def timer(fn):
        fn()
        return 1.0

    _cuda._pick_fastest(_cands(log), reps=3, timer=timer)
    warm = ["fused", "fused", "reference", "reference", "cl", "cl"]
    assert log == warm + ["fused", "reference", "cl"] * 3


@pytest.mark.parametrize("times,winner", [
    ({"fused": [1, 1, 1], "reference": [2, 2, 2], "cl": [3, 3, 3]}, "fused"),
    ({"fused": [3, 3, 3], "reference": [2, 2, 2], "cl": [1, 1, 1]}, "cl"),
    # one slow outlier (a clock still ramping up) does not decide: medians 1.0 against 1.5
    ({"fused": [9, 1, 1], "reference": [1.5, 1.5, 1.5], "cl": [2, 2, 2]}, "fused"),
    # a tie goes to the earlier candidate (the fused kernel)
    ({"fused": [2, 2, 2], "reference": [2, 2, 2], "cl": [2, 2, 2]}, "fused"),
    ({"fused": [3, 3, 3], "reference": [2, 2, 2], "cl": [2, 2, 2]}, "reference"),
])
def test_lowest_median_wins(times, winner):
    log = []
    rounds = {name: iter(t) for name, t in times.items()}

    def timer(fn):
        fn()
        return float(next(rounds[log[-1]]))

    assert _cuda._pick_fastest(_cands(log), reps=3, timer=timer) == winner


def test_medians_are_kept_for_the_report():
    log = []
    rounds = {"fused": iter([3, 1, 2]), "reference": iter([2, 2, 2]), "cl": iter([5, 4, 6])}

    def timer(fn):
        fn()
        return float(rounds[log[-1]].__next__())

    assert _cuda._pick_fastest(_cands(log), reps=3, timer=timer) == "fused"
    assert _cuda._last_timings == {"fused": 2.0, "reference": 2.0, "cl": 5.0}

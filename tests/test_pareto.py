"""densenas.pareto: the non-dominated set by accuracy (max) and latency (min), against brute force."""
import math
import random

import pytest

from densenas.pareto import ParetoPoint, dominates, hypervolume_2d, non_dominated_mask, pareto_front, pareto_table


def brute_force_mask(accs, lats):
    out = []
    for i, (a, l) in enumerate(zip(accs, lats)):
        if a is None or l is None or math.isnan(a) or math.isnan(l):
            out.append(False)
            continue
        out.append(not any(dominates(accs[j], lats[j], a, l) for j in range(len(accs))
                           if j != i and accs[j] is not None and lats[j] is not None
                           and not math.isnan(accs[j]) and not math.isnan(lats[j])))
    return out


def test_dominates_needs_strict_improvement():
    assert dominates(0.9, 1.0, 0.8, 1.0)
    assert dominates(0.8, 0.5, 0.8, 1.0)
    assert not dominates(0.8, 1.0, 0.8, 1.0)          # a twin does not dominate
    assert not dominates(0.9, 2.0, 0.8, 1.0)          # a trade-off does not dominate


def test_small_front_by_hand():
    pts = [ParetoPoint("fast", 0.70, 1.0), ParetoPoint("mid", 0.80, 2.0), ParetoPoint("slow_bad", 0.75, 3.0),
           ParetoPoint("best", 0.85, 4.0), ParetoPoint("dup_mid", 0.80, 2.0), ParetoPoint("nan", float("nan"), 0.1)]
    front = pareto_front(pts)
    assert [p.key for p in front] == ["fast", "dup_mid", "mid", "best"]
    table = pareto_table([{"k": p.key, "accuracy": p.accuracy, "latency": p.latency} for p in pts])
    assert [r["pareto"] for r in table] == [True, True, False, True, True, False]


@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force_with_ties(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    # coarse grids make ties in accuracy, latency and both common
    accs = [rng.choice([None, *[x / 10 for x in range(10)]]) if rng.random() < 0.1 else rng.randint(0, 6) / 6
            for _ in range(n)]
    lats = [rng.randint(1, 8) * 0.5 for _ in range(n)]
    assert non_dominated_mask(accs, lats) == brute_force_mask(accs, lats)


def test_length_mismatch_is_named():
    with pytest.raises(ValueError, match="differ in length"):
        non_dominated_mask([0.1, 0.2], [1.0])


def test_hypervolume_grows_with_a_better_point():
    pts = [ParetoPoint("a", 0.7, 1.0), ParetoPoint("b", 0.8, 2.0)]
    hv = hypervolume_2d(pts, ref_accuracy=0.5, ref_latency=3.0)
    # union of the boxes a: [0.5, 0.7] x [1, 3] (0.4) and b: [0.5, 0.8] x [2, 3] (0.3), overlap 0.2
    assert hv == pytest.approx(0.5)
    assert hypervolume_2d(pts + [ParetoPoint("c", 0.9, 1.0)], 0.5, 3.0) > hv

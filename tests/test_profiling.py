"""densenas.profiling (timing primitives, fingerprints) and densenas.latency_report (the report's maths)."""
import math
import random

import numpy as np
import pytest
import torch

from densenas.latency import (ExpectedLatency, LatencyStats, LatencyTable, LatencyTableError, OpSignature,
                              space_signatures)
from densenas.latency_report import (accuracy_metrics, accuracy_report, fit_correction, loo_predictions,
                                     net_signatures, predict_latency, sample_path, sample_random_nets, spearman)
from densenas.profiling import (ProfilingError, device_fingerprint, fingerprint_mismatch, measure_model_stats,
                                measure_signature_stats, set_cpu_threads, time_module)
from densenas.space import load_space


@pytest.fixture(scope="module")
def micro():
    return load_space("micro_mbconv")


def _fake_table(space, batch=1, num_classes=10):
    """A table with deterministic made-up entries (for the maths; real timing is tested separately)."""
    entries = {s: LatencyStats.from_samples([0.01 * (1 + k % 7)]) for k, s in
               enumerate(space_signatures(space, batch, num_classes))}
    return LatencyTable(entries, space.space_hash(), device_fingerprint("cpu", 1, "float32", batch))


def test_time_module_cpu_counts_and_positive():
    torch.set_num_threads(1)
    samples = time_module(torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), "cpu", warmup=2, repeats=7)
    assert len(samples) == 7 and all(s > 0 for s in samples)
    with pytest.raises(ProfilingError, match="repeats"):
        time_module(torch.nn.Identity(), torch.randn(1), "cpu", 0, 0)


def test_timers_run_the_forwards_without_autograd():
    """A timed forward records no graph (autograd's bookkeeping inflated forwards by 40-70 %, measured)."""
    from densenas.profiling import time_paired

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.is_grad_enabled())
            return x * 2

    time_module(Probe(), torch.randn(2, requires_grad=True), "cpu", warmup=1, repeats=2)
    time_paired(Probe(), torch.randn(2, requires_grad=True), Probe(), torch.randn(2), warmup=1, repeats=2)
    assert seen and not any(seen)


def test_measure_signature_stats_and_bigger_op_is_slower():
    set_cpu_threads(1)
    small = measure_signature_stats(OpSignature("mbconv_k3_e3", 8, 8, 1, 8, 1), "cpu", warmup=2, repeats=15)
    big = measure_signature_stats(OpSignature("mbconv_k5_e6", 32, 32, 1, 32, 4), "cpu", warmup=2, repeats=15)
    assert small.count == 15 and small.p10 <= small.median <= small.p90
    assert big.median > small.median  # ~100x the MACs: no noise hides that


def test_fingerprint_fields_and_mismatch():
    fp = device_fingerprint("cpu", threads=1, dtype="float32", batch=32)
    for k in ("kind", "name", "threads", "torch", "dtype", "batch", "cpu"):
        assert fp[k] is not None, k
    assert fp["threads"] == 1 and fp["batch"] == 32 and fp["dtype"] == "float32"
    other = dict(fp, threads=2, host="elsewhere")
    assert fingerprint_mismatch(fp, other) == ["threads: 1 vs 2"]  # host is recorded, never compared
    with pytest.raises(ProfilingError, match="dtype"):
        device_fingerprint("cpu", 1, "int8", 1)
    if not torch.cuda.is_available():
        with pytest.raises(ProfilingError, match="CUDA"):
            device_fingerprint("cuda")


def test_uniform_path_sampler_covers_all_paths(micro):
    rng = random.Random(0)
    paths = micro.paths()
    seen = {sample_path(micro, rng) for _ in range(40 * len(paths))}
    assert seen == set(paths)


def test_random_nets_distinct_reproducible_and_buildable(micro):
    from densenas.arch import build_model

    nets = sample_random_nets(micro, 6, seed=3, num_classes=10)
    again = sample_random_nets(micro, 6, seed=3, num_classes=10)
    assert [n.key for n in nets] == [n.key for n in again]
    assert len({n.key for n in nets}) == 6
    for n in nets[:2]:
        out = build_model(n.arch).eval()(torch.randn(1, 1, 16, 16))
        assert out.shape == (1, 10)


def test_prediction_equals_search_formula(micro):
    """The report's table sum is the cost the search's expected latency gives the same concrete net."""
    table = _fake_table(micro)
    model = ExpectedLatency(micro, table, num_classes=10)
    from densenas.supernet import SuperNet

    with torch.device("meta"):
        sites = SuperNet(micro, num_classes=10).mixed_ops
    for net in sample_random_nets(micro, 5, seed=1, num_classes=10):
        choice = []
        stack_pos = {}
        for m in sites:  # one op index per mixed op; off-path ones arbitrary (0)
            if m.kind == "head":
                edges = list(zip(net.path, net.path[1:]))
                choice.append(m.op_names.index(net.head_ops[edges.index(m.edge)]) if m.edge in edges else 0)
            else:
                k = stack_pos.get(m.block, 0)
                stack_pos[m.block] = k + 1
                if m.block in net.path[1:]:
                    ops = net.stacking_ops[net.path[1:].index(m.block)]
                    choice.append(m.op_names.index(ops[k]))
                else:
                    choice.append(0)
        assert math.isclose(predict_latency(table, micro, net, 10), model.path_cost(net.path, choice), rel_tol=1e-9)
        assert len(net_signatures(micro, net, 1, 10)) == net.num_layers + 4  # stem, first, final conv, classifier


def test_metrics_and_spearman():
    m = [1.0, 2.0, 3.0, 4.0]
    p = [1.04, 2.08, 3.6, 4.0]  # errors 4 %, 4 %, 20 %, 0 %
    r = accuracy_metrics(p, m)
    assert r["within_5pct"] == 0.75 and r["within_10pct"] == 0.75
    assert math.isclose(r["mape_pct"], (4 + 4 + 20 + 0) / 4, rel_tol=1e-9)
    assert r["spearman"] == 1.0
    assert spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert math.isclose(spearman([1, 2, 2, 3], [1, 2, 3, 4]), 0.9486832980505138)  # ties: average ranks
    with pytest.raises(ValueError, match="> 0"):
        accuracy_metrics([1.0], [0.0])


def test_corrections_recover_known_bias():
    rng = np.random.default_rng(0)
    pred = rng.uniform(1, 5, 30)
    layers = rng.integers(3, 12, 30).astype(float)
    lin = fit_correction("linear", pred, 1.3 * pred + 0.2)
    assert math.isclose(lin.a, 1.3, rel_tol=1e-9) and math.isclose(lin.b, 0.2, abs_tol=1e-9)
    ovh = fit_correction("overhead", pred, pred + 0.05 * layers + 0.1, layers)
    assert math.isclose(ovh.a, 0.05, rel_tol=1e-9) and math.isclose(ovh.b, 0.1, abs_tol=1e-9)
    loo = loo_predictions("linear", pred, 1.3 * pred + 0.2)
    assert np.allclose(loo, 1.3 * pred + 0.2)


def test_report_prefers_correction_when_sum_is_biased(micro):
    nets = sample_random_nets(micro, 12, seed=0, num_classes=10)
    table = _fake_table(micro)
    pred = [predict_latency(table, micro, n, 10) for n in nets]
    meas = [1.25 * p + 0.003 * n.num_layers for p, n in zip(pred, nets)]  # biased: plain sum is ~20 % low
    rep = accuracy_report(nets, pred, meas)
    assert rep["plain_sum"]["within_10pct"] < 0.5
    assert rep["recommended_correction"] in ("linear", "overhead")
    best = rep["corrections"][rep["recommended_correction"]]["leave_one_out"]
    assert best["mape_pct"] < rep["plain_sum"]["mape_pct"]
    assert len(rep["rows"]) == 12 and {"predicted", "measured"} <= set(rep["rows"][0])


def test_table_refuses_other_space_and_device(micro):
    table = _fake_table(micro)
    table2 = LatencyTable.from_json(table.to_json())
    table2.check_compatible(micro, device=device_fingerprint("cpu", 1, "float32", 1))
    with pytest.raises(LatencyTableError, match="search space"):
        table2.check_compatible(load_space("tiny_mbconv"))
    with pytest.raises(LatencyTableError, match="threads"):
        table2.check_compatible(micro, device=device_fingerprint("cpu", 2, "float32", 1))


def test_measure_model_stats_whole_net(micro):
    from densenas.arch import build_model

    net = sample_random_nets(micro, 1, seed=0, num_classes=10)[0]
    st = measure_model_stats(lambda: build_model(net.arch), (1, 1, 16, 16), "cpu", warmup=1, repeats=5)
    assert st.count == 5 and st.median > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_event_timing_path():
    fp = device_fingerprint("cuda", dtype="float32", batch=8)
    assert fp["kind"] == "cuda" and fp["name"] and fp["cuda"] and fp["capability"]
    sig = OpSignature("mbconv_k5_e6", 32, 32, 1, 32, 8)
    st = measure_signature_stats(sig, "cuda", warmup=3, repeats=20)
    assert st.count == 20 and 0 < st.median < 100
    half = measure_signature_stats(sig, "cuda", warmup=3, repeats=5, dtype="float16")
    assert half.count == 5 and half.median > 0

"""Latency model: signatures, tables (round trip, refusals), MACs model, expected latency vs brute force."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from densenas.latency import (
    ExpectedLatency,
    LatencyStats,
    LatencyTable,
    LatencyTableError,
    MacsCostModel,
    MissingSignaturesError,
    OpSignature,
    build_signature_module,
    describe_device,
    expected_latency,
    final_signature,
    head_signature,
    signature_macs,
    space_signatures,
    stack_signature,
)
from densenas.space import load_space
from densenas.supernet import SuperNet


def _fake_table(space, batch=2, num_classes=10, device=None, scale=1.0) -> LatencyTable:
    """A table with deterministic, distinct values (as if measured) for every signature of the space."""
    entries = {}
    for n, sig in enumerate(space_signatures(space, batch, num_classes)):
        v = scale * (1.0 + (signature_macs(sig) % 997) / 100 + n / 1000)
        entries[sig] = LatencyStats(v, v, 0.1, v * 0.9, v * 1.1, 7)
    return LatencyTable(entries, space.space_hash(), device or {"kind": "cpu", "name": "test-cpu", "threads": 1})


def test_signatures_cover_the_space_by_shape():
    space = load_space("tiny_mbconv")
    sigs = space_signatures(space, batch=4, num_classes=10)
    assert len(sigs) == len(set(sigs)), "deduplicated"
    keys = {s.key for s in sigs}
    stem, fl = space.stem, space.first_layer
    assert f"conv3x3:1:{stem.out}:{stem.stride}:{space.input_size}:4" in keys  # stem at the input resolution
    # first layer fed the stem output
    assert f"{fl.op}:{stem.out}:{fl.out}:{fl.stride}:{space.input_size // stem.stride}:4" in keys
    # every head op of edge 1->2 fed block 1's output, with the edge's stride
    b1, b2 = space.blocks[1], space.blocks[2]
    for op in space.head_ops:
        assert OpSignature(op, b1.width, b2.width, b1.resolution // b2.resolution, b1.resolution, 4) in sigs
    last, r_end = space.last_conv_channels, space.blocks[-1].resolution
    for b in space.final_blocks:  # one 1x1 conv branch per final block, then the classifier
        assert OpSignature("conv1x1", space.blocks[b].width, last, 1, r_end, 4) in sigs
    assert OpSignature("classifier", last, 10, 1, r_end, 4) in sigs
    n_heads = len({(space.blocks[i].width, space.blocks[j].width, s, space.blocks[i].resolution)
                   for (i, j, s) in space.head_edges if i > 0})
    n_stack = len({b.index for b in space.blocks if b.n_stacking})
    assert len(sigs) == 2 + (n_heads + 1) * len(space.head_ops) + n_stack * len(space.stacking_ops) + len(space.final_blocks) + 1
    for s in sigs:
        assert OpSignature.parse(s.key) == s


def test_resnet_space_without_last_conv_has_per_block_classifiers():
    space = load_space("tiny_resnet")
    sigs = space_signatures(space, 1, 10)
    cls = [s for s in sigs if s.op == "classifier"]
    assert sorted(s.c_in for s in cls) == sorted(space.blocks[b].width for b in space.final_blocks)
    assert not any(s.op == "conv1x1" for s in sigs)


def test_signature_modules_run_at_their_shape():
    space = load_space("micro_mbconv")
    for sig in space_signatures(space, 2, 5):
        m = build_signature_module(sig).eval()
        y = m(torch.randn(sig.batch, sig.c_in, sig.resolution, sig.resolution))
        assert y.shape[0] == sig.batch and y.shape[1] == sig.c_out


def test_table_json_round_trip_and_lookup(tmp_path):
    space = load_space("micro_mbconv")
    table = _fake_table(space)
    path = tmp_path / "table.json"
    table.to_json(path)
    doc = json.loads(path.read_text())
    assert doc["units"] == "ms" and doc["space_hash"] == space.space_hash() and doc["batch"] == 2
    first = next(iter(doc["entries"].values()))
    assert set(first) == {"mean", "median", "std", "p10", "p90", "count"}
    back = LatencyTable.from_json(path)
    assert back.entries == table.entries and back.device == table.device
    sig = space_signatures(space, 2, 10)[3]
    assert back.lookup(sig) == table.stats(sig).median
    back.check_compatible(space, device={"kind": "cpu", "name": "test-cpu", "threads": 1}, num_classes=10)


def test_table_refuses_other_space_device_and_names_missing_signatures():
    space, other = load_space("micro_mbconv"), load_space("tiny_mbconv")
    table = _fake_table(space)
    with pytest.raises(LatencyTableError, match="made for search space"):
        table.check_compatible(other)
    with pytest.raises(LatencyTableError, match="another device.*threads"):
        table.check_compatible(space, device={"kind": "cpu", "name": "test-cpu", "threads": 8})
    with pytest.raises(LatencyTableError, match="another device"):
        table.check_compatible(space, device={"kind": "cuda", "name": "NVIDIA H100"})
    with pytest.raises(MissingSignaturesError, match="classifier:32:11"):
        table.check_compatible(space, num_classes=11)
    gone = space_signatures(space, 2, 10)[5]
    partial = LatencyTable({s: v for s, v in table.entries.items() if s != gone}, space.space_hash(), table.device)
    with pytest.raises(MissingSignaturesError) as e:
        partial.check_compatible(space)
    assert gone.key in str(e.value) and e.value.missing == [gone]
    with pytest.raises(MissingSignaturesError, match=gone.key):
        ExpectedLatency(SuperNet(space, 10), partial)


@torch.no_grad()
def _measure_table(space, batch: int, num_classes: int, warmup: int, repeats: int) -> LatencyTable:
    """Every signature of the space timed in this process (eval mode, no grad, wall clock)."""
    import time

    entries = {}
    for sig in space_signatures(space, batch, num_classes):
        module = build_signature_module(sig).eval()
        x = torch.randn(sig.batch, sig.c_in, sig.resolution, sig.resolution)
        for _ in range(warmup):
            module(x)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            module(x)
            samples.append((time.perf_counter() - t0) * 1e3)
        entries[sig] = LatencyStats.from_samples(samples)
    return LatencyTable(entries, space.space_hash(), describe_device("cpu"),
                        meta={"warmup": warmup, "repeats": repeats, "num_classes": num_classes})


def test_measured_table_fits_its_space():
    space = load_space("micro_mbconv")
    torch.manual_seed(0)
    table = _measure_table(space, batch=1, num_classes=4, warmup=1, repeats=3)
    table.check_compatible(space, device="cpu", num_classes=4)
    assert all(st.count == 3 and st.p10 <= st.median <= st.p90 for st in table.entries.values())
    net = SuperNet(space, 4)
    lat = expected_latency(net, [m.alpha for m in net.mixed_ops], list(net.betas), table)
    assert lat.item() > 0


def _hook_macs(module: nn.Module, x: torch.Tensor) -> int:
    """Conv2d + Linear multiply-adds counted from the real module's forward."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
    hs = [m.register_forward_hook(hook) for m in module.modules()]
    module.eval()(x)
    for h in hs:
        h.remove()
    return total


def test_macs_model_matches_counted_modules_and_skip_is_a_tenth_of_a_basic_block():
    for name in ("tiny_mbconv", "tiny_resnet"):
        space = load_space(name)
        for sig in space_signatures(space, 1, 10):
            x = torch.randn(1, sig.c_in, sig.resolution, sig.resolution)
            assert signature_macs(sig) == _hook_macs(build_signature_module(sig), x), sig.key
    space = load_space("tiny_resnet")
    model = MacsCostModel(space)
    sig = stack_signature(space, "skip", 3, 1)
    assert model.lookup(sig) == pytest.approx(0.1 * model.lookup(sig._replace(op="basic_block")))
    assert model.lookup(sig.with_batch(4)) == pytest.approx(4 * model.lookup(sig))
    with pytest.raises(LatencyTableError, match="MACs cost model was built for space"):
        model.check_compatible(load_space("micro_mbconv"))


def _brute_force(net, cost_model, alphas, betas) -> float:
    """Expected cost summed over every block path, weighted by its Markov-chain probability."""
    space = net.space
    batch = cost_model.batch
    end = space.end_node
    pos = {(i, j): k for i in range(len(space.blocks)) for k, (_, j, _) in enumerate(space.out_edges(i))}
    p = {e: float(torch.softmax(betas[e[0]].double(), 0)[k]) for e, k in pos.items()}
    exp_cost = []
    for m, a in zip(net.mixed_ops, alphas):
        q = torch.softmax(a.double(), 0)
        sig = (lambda o: head_signature(space, o, *m.edge, batch)) if m.kind == "head" else \
              (lambda o: stack_signature(space, o, m.block, batch))
        exp_cost.append(sum(float(q[k]) * cost_model.lookup(sig(o)) for k, o in enumerate(m.op_names)))
    fixed = cost_model.lookup(space_signatures(space, batch, net.num_classes)[0])
    if space.first_layer is not None:
        fixed += cost_model.lookup(space_signatures(space, batch, net.num_classes)[1])
    if space.last_conv_channels is not None:
        fixed += cost_model.lookup(space_signatures(space, batch, net.num_classes)[-1])
    total, mass = 0.0, 0.0
    for path in space.paths():
        edges = list(zip(path, list(path[1:]) + [end]))
        prob = math.prod(p[e] for e in edges)
        cost = fixed + cost_model.lookup(final_signature(space, path[-1], batch, net.num_classes))
        for m, c in zip(net.mixed_ops, exp_cost):
            if (m.kind == "head" and tuple(m.edge) in edges) or (m.kind == "stack" and m.block in path):
                cost += c
        total += prob * cost
        mass += prob
    assert mass == pytest.approx(1.0, abs=1e-9)
    return total


@pytest.mark.parametrize("name", ["micro_mbconv", "tiny_mbconv", "tiny_resnet"])
def test_expected_latency_equals_brute_force_over_paths(name):
    space = load_space(name)
    net = SuperNet(space, 10)
    gen = torch.Generator().manual_seed(1)
    for cost_model in (MacsCostModel(space), _fake_table(space)):
        model = ExpectedLatency(net, cost_model)
        for _ in range(3):
            alphas = [torch.randn(len(m.op_names), generator=gen, dtype=torch.float64) * 2 for m in net.mixed_ops]
            betas = [torch.randn(len(b), generator=gen, dtype=torch.float64) * 2 for b in net.betas]
            got = model(alphas, betas).item()
            assert got == pytest.approx(_brute_force(net, cost_model, alphas, betas), rel=1e-10)
    # the space alone (same mixed-op order as the super network) gives the same number
    alphas = [m.alpha for m in net.mixed_ops]
    same = ExpectedLatency(space, MacsCostModel(space), num_classes=10)(alphas, list(net.betas))
    assert same.item() == pytest.approx(ExpectedLatency(net, MacsCostModel(space))(alphas, list(net.betas)).item())


def test_expected_latency_gradients_are_exact():
    space = load_space("micro_mbconv")
    net = SuperNet(space, 10)
    model = ExpectedLatency(net, _fake_table(space))
    n_a = len(net.mixed_ops)
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(len(m.op_names), generator=gen, dtype=torch.float64, requires_grad=True)
              for m in net.mixed_ops] + [torch.randn(len(b), generator=gen, dtype=torch.float64, requires_grad=True)
                                         for b in net.betas]
    assert torch.autograd.gradcheck(lambda *ps: model(list(ps[:n_a]), list(ps[n_a:])), params)


def test_expected_latency_of_a_one_hot_architecture_is_its_path_cost():
    space = load_space("tiny_mbconv")
    net = SuperNet(space, 10)
    cost_model = MacsCostModel(space)
    model = ExpectedLatency(net, cost_model)
    path = list(space.paths()[7])
    ops = [k % len(m.op_names) for k, m in enumerate(net.mixed_ops)]
    alphas = [torch.full((len(m.op_names),), -60.0, dtype=torch.float64).index_fill(0, torch.tensor([c]), 60.0)
              for m, c in zip(net.mixed_ops, ops)]
    betas = []
    for i in range(len(space.blocks)):
        nxt = path[path.index(i) + 1] if i in path[:-1] else (space.end_node if i == path[-1] else None)
        outs = [j for (_, j, _) in space.out_edges(i)]
        betas.append(torch.tensor([60.0 if j == nxt else -60.0 for j in outs], dtype=torch.float64))
    assert model(alphas, betas).item() == pytest.approx(model.path_cost(path, ops), rel=1e-9)


# --------------------------------------------------------------------------- the latency model
from densenas.latency import predict_latency  # noqa: E402
from densenas.latency_model import (Calibration, LatencyModel, MeasurementProtocol,  # noqa: E402
                                    ProtocolMismatchError, arch_signatures, cli_main, fit_calibration,
                                    measure_net_latency, table_protocol, unit_features,
                                    unit_kind_sums)
from densenas.latency_report import net_signatures, sample_random_nets  # noqa: E402


def _op_choice(sites, net):
    """One op index per mixed op for a concrete random net (off-path mixed ops: 0)."""
    choice, stack_pos = [], {}
    for m in sites:
        if m.kind == "head":
            edges = list(zip(net.path, net.path[1:]))
            choice.append(m.op_names.index(net.head_ops[edges.index(m.edge)]) if m.edge in edges else 0)
        else:
            k = stack_pos.get(m.block, 0)
            stack_pos[m.block] = k + 1
            on = m.block in net.path[1:]
            choice.append(m.op_names.index(net.stacking_ops[net.path[1:].index(m.block)][k]) if on else 0)
    return choice


def test_protocol_round_trip_and_mismatch_is_refused():
    p = MeasurementProtocol(batch=32, threads=1, warmup=5, repeats=30)
    assert MeasurementProtocol.from_dict(p.to_dict()) == p and p.to_dict()["timer"] == "wall"
    p.check_same(MeasurementProtocol.from_dict(p.to_dict()))
    with pytest.raises(ProtocolMismatchError, match="batch: 32 vs 1"):
        p.check_same(p.with_(batch=1))
    with pytest.raises(ProtocolMismatchError, match="memory_format"):
        p.check_same(p.with_(memory_format="channels_last"))
    with pytest.raises(ValueError, match="memory_format"):
        MeasurementProtocol(memory_format="nhwc")
    with pytest.raises(ProtocolMismatchError, match="no measurement protocol"):
        table_protocol(_fake_table(load_space("micro_mbconv")))
    assert "statistic" not in p.measurement_key()


def test_reference_protocol_times_in_the_reference_ms_and_refuses_what_it_cannot_do():
    """A reference protocol turns each forward's ratio to the reference workload into the table's ms:
    timing the reference itself against itself gives its reference_ms; a protocol without reference_ms,
    a reference on CUDA or an unparseable reference is refused with the reason."""
    from densenas.latency import build_signature_module
    from densenas.latency_model import DEFAULT_REFERENCE, reference_latency_ms, time_forward

    p = MeasurementProtocol(batch=2, threads=1, warmup=2, repeats=9, timer="thread_cpu", allocator="steady",
                            reference=DEFAULT_REFERENCE)
    ref_ms = reference_latency_ms(p)
    assert ref_ms > 0
    sig = p.reference_signature()
    assert sig.batch == 2 and sig.key == f"{DEFAULT_REFERENCE}:2"
    with pytest.raises(ProtocolMismatchError, match="reference_ms"):
        time_forward(build_signature_module(sig), (2, sig.c_in, sig.resolution, sig.resolution), p)
    p = p.with_(reference_ms=ref_ms)
    own = time_forward(build_signature_module(sig), (2, sig.c_in, sig.resolution, sig.resolution), p)
    assert own.median == pytest.approx(ref_ms, rel=0.35)  # a ratio near 1, in the reference's ms
    assert "reference_ms" not in p.measurement_key() and p.measurement_key()["reference"] == DEFAULT_REFERENCE
    # Paired with a net, as the profile stage fixes it: the net's value then reads as its own ms.
    arch = sample_random_nets(load_space("micro_mbconv"), 1, seed=0, num_classes=10)[0].arch.to_dict()
    p = p.with_(reference_ms=reference_latency_ms(p, paired_with=arch, num_classes=10))
    lat = measure_net_latency(arch, p, num_classes=10)
    assert lat["value"] == lat["median"] and lat["plain_median"] > 0 and lat["reference_paired_median"] > 0
    # The value is the net's time in reference units x reference_ms. Compared with the plain times of the
    # same forwards, not across calls: the machine's speed may drift between fixing reference_ms and this.
    assert lat["value"] / p.reference_ms == pytest.approx(lat["plain_median"] / lat["reference_paired_median"],
                                                          rel=0.35)
    assert lat["protocol"]["reference_ms"] == p.reference_ms
    # A record from before these fields: measured plainly, with glibc's default allocator.
    old = {k: v for k, v in p.to_dict().items() if k not in ("allocator", "reference", "reference_ms")}
    assert MeasurementProtocol.from_dict(old).reference == "none"
    assert MeasurementProtocol.from_dict(old).allocator == "default"
    with pytest.raises(ValueError, match="CUDA use reference 'none'"):
        MeasurementProtocol(device="cuda", threads=None, reference=DEFAULT_REFERENCE)
    with pytest.raises(ValueError, match="op signature without its batch"):
        MeasurementProtocol(reference="mbconv_k3_e6")
    with pytest.raises(ValueError, match="allocator"):
        MeasurementProtocol(allocator="jemalloc")


def test_calibration_recovers_known_coefficients():
    raw = [3.0, 5.0, 8.0, 4.0, 10.0, 6.5]
    units = [8, 11, 14, 9, 15, 12]
    measured = [1.2 * s + 0.05 * n + 0.4 for s, n in zip(raw, units)]
    c = fit_calibration(raw, units, measured)
    assert c.scale == pytest.approx(1.2) and c.layer_ms == pytest.approx(0.05) and c.fixed_ms == pytest.approx(0.4)
    assert c.fitted_on["n_nets"] == 6 and c.fitted_on["in_sample_mape_pct"] < 1e-6
    two = fit_calibration([1.0, 2.0], [5, 5], [1.5, 2.5])  # too few nets: scale and fixed part only
    assert two.layer_ms == 0 and two.scale == pytest.approx(1.0) and two.fixed_ms == pytest.approx(0.5)


def test_calibration_scale_stays_positive_when_the_measurements_are_noise():
    """Nets whose measured latency falls as their raw sum grows (timing noise on a busy machine, as on a
    CI run of the micro space) still give a usable model: the scale alone, > 0, not a negative slope."""
    raw = [0.9, 1.1, 1.4, 1.6]
    units = [6, 6, 6, 6]
    measured = [3.6, 3.3, 3.1, 2.9]
    c = fit_calibration(raw, units, measured)
    assert c.scale > 0 and c.layer_ms == 0 and c.fixed_ms == 0
    ratios = [m_ / s_ for s_, m_ in zip(raw, measured)]
    assert min(ratios) < c.scale < max(ratios)


def test_model_is_what_the_search_derive_and_cli_use(tmp_path, capsys):
    """The calibrated model decomposes per signature: the search's path cost of a net, the model's
    prediction from its signatures and predict_latency(arch, table) agree; skips cost nothing."""
    micro = load_space("micro_mbconv")
    table = _fake_table(micro, batch=2)
    table.device["protocol"] = MeasurementProtocol(batch=2).to_dict()
    cal = Calibration(scale=1.3, layer_ms=0.07, fixed_ms=0.9, op_scales={"mbconv_k3_e3": 1.6})
    model = LatencyModel.from_table(table, cal, micro)
    skip = next(s for s in space_signatures(micro, 2, 10) if s.op == "skip")
    assert model.lookup(skip) == 0 and model.raw_lookup(skip) > 0
    with torch.device("meta"):
        sites = SuperNet(micro, num_classes=10).mixed_ops
    expected = ExpectedLatency(micro, model, num_classes=10)
    for net in sample_random_nets(micro, 6, seed=3, num_classes=10):
        sigs = net_signatures(micro, net, 2, 10)
        raw, n = unit_features(table, sigs)
        k3e3 = unit_kind_sums(table, sigs).get("mbconv_k3_e3", 0.0)
        want = 1.3 * (raw - k3e3) + 1.6 * k3e3 + 0.07 * n + 0.9
        assert model.predict_signatures(sigs) == pytest.approx(want)
        assert expected.path_cost(net.path, _op_choice(sites, net)) == pytest.approx(want)
        assert predict_latency(net.arch, model) == pytest.approx(want)
        assert arch_signatures(net.arch, 2) == [s for s in sigs if s.op != "skip"]
    # The document round trip serves the model again (search, derive, retrain all load it this way).
    path = tmp_path / "latency_table.json"
    model.to_json(path)
    again = LatencyTable.from_json(path)
    assert isinstance(again, LatencyModel) and again.calibration.scale == 1.3
    assert type(LatencyTable.from_dict(again.raw_table().to_dict())) is LatencyTable
    net = sample_random_nets(micro, 1, seed=9, num_classes=10)[0]
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(net.arch.to_json() if hasattr(net.arch, "to_json") else json.dumps(net.arch.to_dict()))
    assert cli_main(["predict", "--table", str(path), "--arch", str(arch_file)]) == 0
    out = capsys.readouterr().out
    assert f"{predict_latency(net.arch, again):.4f} ms" in out and "batch=2" in out and "calibration" in out


def test_measure_net_latency_follows_the_protocol():
    micro = load_space("micro_mbconv")
    arch = sample_random_nets(micro, 1, seed=0, num_classes=10)[0].arch
    p = MeasurementProtocol(batch=2, threads=1, warmup=1, repeats=3, statistic="p10")
    threads = torch.get_num_threads()
    out = measure_net_latency(arch, p)
    assert out["count"] == 3 and out["value"] == out["p10"] > 0 and out["protocol"]["batch"] == 2
    assert torch.get_num_threads() == threads  # the caller's thread count is restored
    cl = measure_net_latency(arch, p.with_(memory_format="channels_last"))
    assert cl["protocol"]["memory_format"] == "channels_last" and cl["value"] > 0


def test_per_op_calibration_is_chosen_only_when_it_predicts_left_out_nets_better():
    rng = __import__("random").Random(0)
    kinds = [{"a": rng.uniform(1, 5), "b": rng.uniform(1, 5), "stem": 1.0} for _ in range(16)]
    units = [rng.randint(6, 12) for _ in kinds]
    truth = Calibration(scale=1.1, layer_ms=0.03, fixed_ms=0.2, op_scales={"a": 1.5, "b": 0.9})
    measured = [truth.predict(k, u) for k, u in zip(kinds, units)]
    raw = [sum(k.values()) for k in kinds]
    c = fit_calibration(raw, units, measured, kind_sums=kinds, per_op=["a", "b"])
    assert c.form == "per_op" and c.op_scales == pytest.approx({"a": 1.5, "b": 0.9})
    assert c.fitted_on["calibration_loo_mape_pct"]["per_op"] < c.fitted_on["calibration_loo_mape_pct"]["shared"]
    same = [1.2 * r + 0.05 * u + 0.3 for r, u in zip(raw, units)]  # one scale is the truth: keep the shared form
    assert fit_calibration(raw, units, same, kind_sums=kinds, per_op=["a", "b"]).scale == pytest.approx(1.2)


@pytest.mark.gpu
def test_cuda_protocol_times_with_cuda_events_and_a_table_protocol_round_trips():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    micro = load_space("micro_mbconv")
    arch = sample_random_nets(micro, 1, seed=0, num_classes=10)[0].arch
    p = MeasurementProtocol(device="cuda", batch=8, threads=None, warmup=3, repeats=10)
    out = measure_net_latency(arch, p)
    assert out["protocol"]["timer"] == "cuda_events" and out["value"] > 0 and out["count"] == 10
    assert MeasurementProtocol.from_dict(out["protocol"]) == p


def test_retrain_latency_uses_the_table_protocol_and_refuses_a_contradiction():
    from jobs.retrain import RetrainConfig, latency_setup

    table = _fake_table(load_space("micro_mbconv"), batch=2)
    proto = MeasurementProtocol(batch=2, threads=1, warmup=3, repeats=7, timer="thread_cpu")
    table.device["protocol"] = proto.to_dict()
    assert MeasurementProtocol.from_dict(latency_setup(RetrainConfig(), table)) == proto
    assert MeasurementProtocol.from_dict(latency_setup(RetrainConfig(latency_batch=2), table)) == proto
    with pytest.raises(ProtocolMismatchError, match="latency_batch=1 vs the table's 2"):
        latency_setup(RetrainConfig(latency_batch=1), table)
    # no table: the config's own protocol (batch 1, 1 thread, wall clock)
    assert latency_setup(RetrainConfig(), None)["batch"] == 1

"""Derivation: Viterbi, k-best and budgeted paths against brute force; argmax ops -> architecture."""
from __future__ import annotations

import math

import pytest
import torch

from densenas.derive import (
    best_path_within,
    derive,
    k_best_paths,
    path_log_prob,
    viterbi_path,
)
from densenas.latency import ExpectedLatency, MacsCostModel
from densenas.space import load_space
from densenas.supernet import SuperNet


def _random_probs(space, gen, scale=2.0):
    probs = {}
    for i in range(len(space.blocks)):
        outs = space.out_edges(i)
        p = torch.softmax(torch.randn(len(outs), generator=gen, dtype=torch.float64) * scale, 0)
        probs.update({(a, b): float(p[k]) for k, (a, b, _) in enumerate(outs)})
    return probs


def _ranked(space, probs):
    scored = [(path_log_prob(space, probs, p), list(p)) for p in space.paths()]
    return sorted(scored, key=lambda t: (-t[0], t[1]))


@pytest.mark.parametrize("name", ["micro_mbconv", "tiny_mbconv", "tiny_resnet", "imagenet_mbconv"])
def test_viterbi_and_k_best_match_brute_force(name):
    space = load_space(name)
    gen = torch.Generator().manual_seed(3)
    for trial in range(3 if name != "imagenet_mbconv" else 1):
        probs = _random_probs(space, gen)
        ranked = _ranked(space, probs)
        best = viterbi_path(space, probs)
        assert best[0] == 0 and best[-1] in space.final_blocks
        assert path_log_prob(space, probs, best) == pytest.approx(ranked[0][0], abs=1e-12)
        k = min(6, len(ranked))
        top = k_best_paths(space, probs, k)
        assert [math.log(p) for _, p in top] == pytest.approx([s for s, _ in ranked[:k]], abs=1e-9)
        assert top[0][0] == best


def test_viterbi_accepts_tensors_and_rejects_incomplete_probs():
    net = SuperNet("micro_mbconv", 3)
    with torch.no_grad():
        for b in net.betas:
            b.normal_()
    path = viterbi_path(net.space, net.edge_probs())
    assert path[0] == 0
    probs = dict(net.edge_probs())
    probs.pop(next(iter(probs)))
    with pytest.raises(ValueError, match="lacks 1 edge"):
        viterbi_path(net.space, probs)


@pytest.mark.parametrize("name", ["tiny_mbconv", "tiny_resnet"])
def test_budgeted_path_matches_brute_force(name):
    space = load_space(name)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        probs = _random_probs(space, gen)
        costs = {(i, j): float(torch.rand((), generator=gen)) * 5 + 0.1 for (i, j, _) in space.edges}
        fixed = 1.0
        all_costs = [fixed + sum(costs[e] for e in zip(p, list(p[1:]) + [space.end_node])) for p in space.paths()]
        for budget in (min(all_costs) - 0.01, sorted(all_costs)[len(all_costs) // 3], max(all_costs) + 1):
            got = best_path_within(space, probs, costs, budget, fixed)
            feasible = [(path_log_prob(space, probs, p), list(p), c) for p, c in zip(space.paths(), all_costs)
                        if c <= budget]
            if not feasible:
                assert got is None
                continue
            want = max(feasible, key=lambda t: t[0])
            assert got is not None and math.log(got[1]) == pytest.approx(want[0], abs=1e-9)
            assert got[2] <= budget and got[2] == pytest.approx(
                fixed + sum(costs[e] for e in zip(got[0], got[0][1:] + [space.end_node])))


def test_derive_takes_argmax_ops_removes_skips_and_predicts_the_path_cost():
    space = load_space("tiny_mbconv")
    torch.manual_seed(0)
    net = SuperNet(space, 10)
    with torch.no_grad():
        for m in net.mixed_ops:
            m.alpha.normal_()
            if m.kind == "stack" and m.block == 2:
                m.alpha[m.op_names.index("skip")] = 10.0  # block 2's stacking layers are skipped
        for b in net.betas:
            b.normal_()
    cost_model = MacsCostModel(space)
    d = derive(net, cost_model, build_arch=False)
    assert d.path == viterbi_path(space, net.edge_probs())
    for k, m in enumerate(net.mixed_ops):
        assert d.op_choice[k] == int(m.alpha.argmax())
    on_path = {b["block"]: b for b in d.blocks}
    if 2 in on_path:
        assert on_path[2]["stack"] == []
    for b in d.blocks:
        assert "skip" not in b["stack"] and b["head"] in space.head_ops
    assert d.predicted_cost == pytest.approx(ExpectedLatency(net, cost_model).path_cost(d.path, d.op_choice))
    assert d.official.count("|") == len(d.blocks) + 1  # first layer + blocks + last conv
    assert d.official.endswith(f"'conv1_1']") and "_t" in d.official

    # A budget below the Viterbi path's cost gives a cheaper (less probable) path, within budget.
    latency = ExpectedLatency(net, cost_model)
    cheapest = min(latency.path_cost(p, d.op_choice) for p in space.paths())
    assert cheapest < d.predicted_cost
    budget = (cheapest + d.predicted_cost) / 2
    cheaper = derive(net, cost_model, budget=budget, build_arch=False)
    assert cheaper.predicted_cost <= budget and cheaper.path_prob <= d.path_prob
    with pytest.raises(ValueError, match="no path of the space fits the budget"):
        derive(net, cost_model, budget=1e-9, build_arch=False)


def test_derived_arch_builds_and_its_counts_match_the_cost_model():
    from densenas.arch import Arch, build_model
    from densenas.counting import count_macs

    for name in ("tiny_mbconv", "tiny_resnet"):
        space = load_space(name)
        torch.manual_seed(1)
        net = SuperNet(space, 7)
        with torch.no_grad():
            for p in net.arch_parameters():
                p.normal_()
        d = derive(net, MacsCostModel(space, skip_fraction=0.0))
        arch = d.arch
        assert isinstance(arch, Arch) and arch.num_classes == 7
        assert arch.metadata["path"] == d.path
        assert Arch.from_json(arch.to_json()) == arch
        model = build_model(arch)
        assert model(torch.randn(2, space.in_channels, space.input_size, space.input_size)).shape == (2, 7)
        # the cost model's MACs of the derived path are the built network's MACs
        assert count_macs(model, space.input_size, space.in_channels) == round(d.predicted_cost * 1e6)
        if space.last_conv_channels is not None:
            assert arch.to_official() == d.official

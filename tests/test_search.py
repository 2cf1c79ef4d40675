"""Search loop: config, weight step, exact re-balanced architecture step, hooks, resume, CLI."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from densenas.search import CollapseWarning, SearchConfig, Searcher, iterate_batches, latency_loss
from densenas.search_cli import DataSection, SearchRunConfig, _load_data, main
from densenas.supernet import SuperNet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine is 2 shared cores: oversubscribed OpenMP threads spin
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def micro_data():
    """A small real split (4 classes of the embedded dataset, 16x16) for micro_mbconv."""
    return _load_data(DataSection(classes=4, image_size=16, samples_per_class=40, val_fraction=0.25, seed=0))


def _searcher(cfg: SearchConfig, steps: int = 2, seed: int = 0, grad_sync=None) -> Searcher:
    torch.manual_seed(seed)
    return Searcher(SuperNet("micro_mbconv", 4), cfg, steps_per_epoch=steps, grad_sync=grad_sync, log=None)


def test_config_defaults_are_the_paper_and_yaml_spells_lambda():
    c = SearchConfig()
    assert (c.epochs, c.warmup_epochs, c.batch_size) == (250, 150, 352)
    assert (c.weights.lr, c.weights.lr_min, c.weights.momentum, c.weights.weight_decay) == (0.2, 1e-4, 0.9, 4e-5)
    assert (c.arch.lr, c.arch.betas, c.arch.weight_decay) == (3e-4, (0.5, 0.999), 1e-3)
    assert (c.lambda_, c.tau) == (0.15, 15.0)
    assert SearchConfig.model_validate({"lambda": 0.3}).lambda_ == 0.3
    assert SearchConfig.model_validate(c.dump()) == c and "lambda" in c.dump()
    for bad in ({"lambda": -0.1}, {"tau": 1.0}, {"lamda": 0.1}, {"epochs": 5, "warmup_epochs": 6}):
        with pytest.raises(ValueError):
            SearchConfig.model_validate(bad)
    with pytest.raises(ValueError, match="tau must be > 1"):
        latency_loss(torch.tensor(2.0), 0.1, 0.5)
    run = SearchRunConfig.from_yaml(REPO / "configs" / "search_tiny.yaml")
    assert run.search.warmup_epochs < run.search.epochs


def test_weight_step_updates_only_sampled_ops_and_follows_the_cosine_schedule(micro_data):
    tx, ty, *_ = micro_data
    cfg = SearchConfig(epochs=1, warmup_epochs=1, batch_size=16)
    s = _searcher(cfg, steps=3)
    arch_before = [p.detach().clone() for p in s.arch_params]
    ops_before = {id(m): [p.detach().clone() for p in m.parameters() if p is not m.alpha] for m in s.net.mixed_ops}
    s._epoch_step = 0
    choices = s.net.sample_choices("uniform1", s._reseed("weight"))  # what the first step will draw
    s._epoch_step = 0
    s.weight_step((tx[:16], ty[:16]))
    assert all(torch.equal(a, b) for a, b in zip(arch_before, s.arch_params)), "no arch update in a weight step"
    assert all(p.grad is None for p in s.arch_params)
    for m, c in zip(s.net.mixed_ops, choices):
        for k, op in enumerate(m.ops):
            before = ops_before[id(m)]
            params = [p for p in m.parameters() if p is not m.alpha]
            own = {id(p) for p in op.parameters()}
            changed = any(not torch.equal(b, p) for b, p in zip(before, params) if id(p) in own)
            if list(op.parameters()):
                assert changed == (k in c), f"{m.kind} {m.edge or m.block} op {k}: sampled={k in c}"
    for batch in list(iterate_batches(tx, ty, 16, 0, 0))[:2]:
        s.weight_step(batch)
    assert s.weight_optimizer.param_groups[0]["lr"] == pytest.approx(cfg.weights.lr_min)


def test_steps_put_a_network_left_in_eval_mode_back_in_training(micro_data):
    """Every step trains BatchNorm on batch statistics, whatever mode the network (or part of it) was left in."""
    tx, ty, *_ = micro_data
    s = _searcher(SearchConfig(epochs=2, warmup_epochs=1, batch_size=16))
    for step in (s.weight_step, s.arch_step, s.eval_step):
        s.net.eval()
        step((tx[:16], ty[:16]))
        assert all(m.training for m in s.net.modules())
        s.net.mixed_ops[0].eval()
        step((tx[:16], ty[:16]))
        assert all(m.training for m in s.net.modules())


def test_arch_step_rebalance_keeps_unsampled_probabilities_exactly(micro_data):
    _, _, vx, vy, _ = micro_data
    cfg = SearchConfig.model_validate({"epochs": 2, "warmup_epochs": 0, "batch_size": 8, "lambda": 0.5,
                                       "arch": {"lr": 0.2, "weight_decay": 0.1}})
    s = _searcher(cfg)
    with torch.no_grad():
        for m in s.net.mixed_ops:
            m.alpha.normal_()
    moved = False
    for step in range(4):  # Adam's momentum and weight decay move unsampled entries after step 1
        before = [F.softmax(a.detach().double(), 0) for a in s.alphas]
        betas_before = [b.detach().clone() for b in s.betas]
        s._epoch_step = step
        choices = s.net.sample_choices("alpha2", s._reseed("arch"))
        s._epoch_step = step
        s.arch_step((vx[8 * step:8 * step + 8], vy[8 * step:8 * step + 8]))
        for a, p0, c in zip(s.alphas, before, choices):
            p1 = F.softmax(a.detach().double(), 0)
            rest = [k for k in range(len(p0)) if k not in c]
            assert torch.allclose(p1[rest], p0[rest], atol=1e-6, rtol=0), "unsampled probabilities moved"
            assert float(p1[list(c)].sum()) == pytest.approx(float(p0[list(c)].sum()), abs=1e-6)
            moved |= not torch.allclose(p1[list(c)], p0[list(c)], atol=1e-4)
        assert any(not torch.equal(b0, b) for b0, b in zip(betas_before, s.betas)), "beta follows Adam"
    assert moved, "the sampled pairs were updated"


@pytest.mark.parametrize("costs, cheap", [((10.0, 12.0, 1.0), 0),   # the pair above the layer's mean
                                          ((2.0, 1.0, 30.0), 1)])   # the pair below it
def test_arch_step_cheaper_op_of_the_pair_gains_when_features_are_equal(micro_data, costs, cheap):
    """Two sampled ops with identical outputs that differ only in table latency: one architecture step
    moves probability to the cheaper one, whichever side of the layer's mean latency the pair is on."""
    _, _, vx, vy, _ = micro_data
    cfg = SearchConfig.model_validate({"epochs": 2, "warmup_epochs": 0, "batch_size": 8, "lambda": 0.5,
                                       "arch": {"lr": 0.05, "weight_decay": 0.0}})
    s = _searcher(cfg)
    k, layer = next((k, m) for k, m in enumerate(s.net.mixed_ops) if m.kind == "stack")
    assert layer.op_names[:2] == ("mbconv_k3_e3", "mbconv_k5_e3") and layer.op_names[2] == "skip"
    with torch.no_grad():
        for op in layer.ops[:2]:
            op.body[-2].weight.zero_()  # project conv -> 0, BN(0) = 0: both ops output their input
    x = torch.randn(2, layer.c_in, 8, 8)
    assert torch.equal(layer.ops[0](x), layer.ops[1](x))
    n = s.latency.stack_index.index(k)
    s.latency.stack_costs[n] = torch.tensor(costs, dtype=torch.float64)
    choices = list(s.net.sample_choices("alpha2", torch.Generator().manual_seed(1)))
    choices[k] = (0, 1)
    before = F.softmax(layer.alpha.detach().double(), 0)
    s.arch_step((vx[:8], vy[:8]), choices=choices)
    after = F.softmax(layer.alpha.detach().double(), 0)
    dear = 1 - cheap
    assert after[cheap] / after[dear] > before[cheap] / before[dear] * 1.05, (before, after)
    assert after[cheap] > before[cheap] and after[dear] < before[dear]
    assert float(after[2]) == pytest.approx(float(before[2]), abs=1e-6), "the unsampled op's probability moved"


def test_pair_latency_is_the_pair_softmax_mix(micro_data):
    s = _searcher(SearchConfig(epochs=1, warmup_epochs=0, batch_size=8))
    with torch.no_grad():
        for m in s.net.mixed_ops:
            m.alpha.normal_()
    single = s.net.sample_choices("alpha1", torch.Generator().manual_seed(0))
    lat = s.latency(s.alphas, s.betas, single)  # one op per layer: that op's cost
    by_hand = s.latency(s.alphas, s.betas, None)
    assert float(lat.detach()) != pytest.approx(float(by_hand.detach()))
    one_hot = [torch.full_like(a, -1e9).index_fill(0, torch.tensor(c), 0.0) for a, c in zip(s.alphas, single)]
    assert float(lat.detach()) == pytest.approx(float(s.latency(one_hot, s.betas).detach()), rel=1e-9)
    with pytest.raises(ValueError, match="choices"):
        s.latency(s.alphas, s.betas, single[:-1])


def test_grad_sync_sees_weight_and_arch_gradients(micro_data):
    tx, ty, vx, vy, _ = micro_data
    seen: list[tuple[int, int]] = []

    def halve(grads: list[torch.Tensor]) -> None:  # what an all-reduce mean over 2 equal ranks does
        seen.append((len(grads), sum(g.numel() for g in grads)))
        for g in grads:
            g.mul_(0.5)

    cfg = SearchConfig(epochs=2, warmup_epochs=0, batch_size=8)
    s = _searcher(cfg, grad_sync=halve)
    s.weight_step((tx[:8], ty[:8]))
    s.arch_step((vx[:8], vy[:8]))
    assert len(seen) == 2
    assert seen[1] == (len(s.arch_params), sum(p.numel() for p in s.arch_params))
    assert 0 < seen[0][0] < len(s.weight_params)  # only the sampled ops' (and fixed layers') grads


def _run(micro_data, epochs: int, cfg: SearchConfig, state: bytes | None = None) -> tuple[Searcher, bytes]:
    tx, ty, vx, vy, _ = micro_data
    s = _searcher(cfg, steps=len(ty) // cfg.batch_size, seed=123)
    if state is not None:
        s.load_state_dict(torch.load(io.BytesIO(state), weights_only=False))
    while s.epoch < epochs:
        e = s.epoch
        s.run_epoch(iterate_batches(tx, ty, cfg.batch_size, cfg.seed, e, "train"),
                    iterate_batches(vx, vy, cfg.batch_size, cfg.seed, e, "val"))
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    return s, buf.getvalue()


def test_interrupted_and_resumed_search_derives_the_same_architecture(micro_data):
    cfg = SearchConfig.model_validate({"epochs": 4, "warmup_epochs": 1, "batch_size": 20, "seed": 7,
                                       "arch": {"lr": 0.05}, "weights": {"lr": 0.05}})
    straight, _ = _run(micro_data, 4, cfg)
    _, saved = _run(micro_data, 2, cfg)           # "killed" after epoch 2 ...
    torch.manual_seed(999)                        # ... a fresh process with other RNG state ...
    resumed, _ = _run(micro_data, 4, cfg, saved)  # ... resumes from the checkpoint
    a, b = straight.derive(), resumed.derive()
    assert (a.path, a.op_choice, a.official) == (b.path, b.op_choice, b.official)
    for (n, x), (_, y) in zip(straight.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(x, y), n
    assert [r["val_loss"] for r in straight.history] == [r["val_loss"] for r in resumed.history]
    rec = straight.history[-1]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "expected_latency", "derived",
                "predicted_latency", "params", "macs", "alpha_entropy", "beta_entropy", "warnings"):
        assert key in rec
    assert rec["phase"] == "search" and straight.history[0]["phase"] == "warmup"
    with pytest.raises(ValueError, match="steps_per_epoch"):
        Searcher(SuperNet("micro_mbconv", 4), cfg, steps_per_epoch=99, log=None).load_state_dict(
            torch.load(io.BytesIO(saved), weights_only=False))


def test_collapse_is_reported(micro_data):
    tx, ty, vx, vy, _ = micro_data
    cfg = SearchConfig(epochs=2, warmup_epochs=0, batch_size=40)
    s = _searcher(cfg)
    with torch.no_grad():
        for m in s.net.mixed_ops:
            if m.kind == "stack":
                m.alpha[m.op_names.index("skip")] = 50.0
    with pytest.warns(CollapseWarning, match="every stacking layer"):
        rec = s.run_epoch(iterate_batches(tx, ty, 40, 0, 0), iterate_batches(vx, vy, 40, 0, 0), max_steps=1)
    assert any("collapsed" in w for w in rec["warnings"])


@pytest.mark.slow
def test_cli_runs_a_search_and_writes_record_and_architecture(tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / "search_tiny.yaml").read_text())
    cfg["space"] = "micro_mbconv"
    cfg["data"].update(classes=3, image_size=16, samples_per_class=30)
    cfg["search"].update(epochs=2, warmup_epochs=1, batch_size=24)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["--config", str(path), "--out", str(out), "--threads", "1"]) == 0
    lines = [json.loads(l) for l in (out / "search_record.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    derived = json.loads((out / "derived.json").read_text())
    assert derived["path"][0] == 0 and derived["predicted_cost"] > 0
    assert (out / "search_state.pt").exists()
    if (out / "arch.json").exists():
        assert json.loads((out / "arch.json").read_text())


def test_target_mode_moves_lambda_by_dual_ascent(micro_data):
    _, _, vx, vy, _ = micro_data
    base = {"epochs": 2, "warmup_epochs": 0, "batch_size": 8, "lambda": 0.1, "dual_lr": 0.5}
    s = _searcher(SearchConfig.model_validate(base))
    cost = s.derived_cost()
    assert cost == pytest.approx(s.derive().predicted_cost)
    s.arch_step((vx[:8], vy[:8]))
    assert s.lam == 0.1, "without a target, lambda is the configured one"
    over = _searcher(SearchConfig.model_validate({**base, "target_latency": cost / 2}))
    over.arch_step((vx[:8], vy[:8]))
    assert over.lam == pytest.approx(0.1 + 0.5 * (over.derived_cost() / (cost / 2) - 1))
    assert over.lam > 0.1
    under = _searcher(SearchConfig.model_validate({**base, "target_latency": cost * 4, "target_kind": "at_most"}))
    under.arch_step((vx[:8], vy[:8]))
    assert under.lam == 0.0, "a budget clips lambda at 0"
    equal = _searcher(SearchConfig.model_validate({**base, "target_latency": cost * 4}))
    equal.arch_step((vx[:8], vy[:8]))
    assert equal.lam < 0, "an equality target lets lambda go negative"
    equal.arch_step((vx[8:16], vy[8:16]))  # the step with a negative lambda runs
    state = over.state_dict()
    again = _searcher(SearchConfig.model_validate({**base, "target_latency": cost / 2}))
    again.load_state_dict(state)
    assert again.lam == over.lam


def test_a_loaded_state_keeps_the_configs_lambda(micro_data):
    """A sweep trial starts from the shared warm-up's state: the trial's lambda, not the warm-up's,
    weights the latency term (a state carries lambda only as the target mode's adapted dual)."""
    _, _, vx, vy, _ = micro_data
    base = {"epochs": 2, "warmup_epochs": 0, "batch_size": 8, "lambda": 0.15}
    warm = _searcher(SearchConfig.model_validate(base))
    state = warm.state_dict()
    for lam in (0.0, 3.0):
        trial = _searcher(SearchConfig.model_validate({**base, "lambda": lam}))
        trial.load_state_dict(state)
        assert trial.lam == lam
    warm.arch_step((vx[:8], vy[:8]))
    trial = _searcher(SearchConfig.model_validate({**base, "lambda": 3.0}))
    trial.load_state_dict(warm.state_dict())
    assert trial.lam == 3.0, "a fixed lambda is config, even after architecture steps"


def test_arch_steps_per_epoch_replays_the_epochs_val_batches(micro_data):
    tx, ty, vx, vy, _ = micro_data
    cfg = SearchConfig.model_validate({"epochs": 1, "warmup_epochs": 0, "batch_size": 8,
                                       "arch_batch_size": 10, "arch_steps_per_epoch": 7})
    s = _searcher(cfg)
    val = list(iterate_batches(vx, vy, 10, 0, 0, "val"))
    assert 1 < len(val) < 7
    seen = list(s._arch_batches(iter(val)))
    assert len(seen) == 7 and all(any(b is v for v in val) for b in seen)
    assert [id(b) for b in seen] == [id(b) for b in s._arch_batches(iter(val))], "replay order is seeded"
    rec = s.run_epoch(iterate_batches(tx, ty, 8, 0, 0), iterate_batches(vx, vy, 10, 0, 0, "val"))
    assert rec["arch_steps"] == 7 and s.arch_step_count == 7
    for key in ("lambda", "derived_path_prob", "alpha_entropy", "beta_entropy"):
        assert key in rec


def _cli_run(tmp_path, name, *extra):
    cfg = yaml.safe_load((REPO / "configs" / "search_tiny.yaml").read_text())
    cfg["space"] = "micro_mbconv"
    cfg["data"].update(classes=3, image_size=16, samples_per_class=30)
    cfg["search"].update(epochs=3, warmup_epochs=1, batch_size=15, arch_batch_size=6, arch_steps_per_epoch=4,
                         target_latency=0.05, dual_lr=0.2)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / name
    assert main(["--config", str(path), "--out", str(out), "--threads", "1", *extra]) == 0
    return out


def _arch_params(out):
    return json.loads((out / "arch_params.json").read_text()), json.loads((out / "derived.json").read_text())


def test_cli_search_is_reproducible_fresh_and_after_resume(tmp_path):
    a = _cli_run(tmp_path, "a")
    b = _cli_run(tmp_path, "b")
    _cli_run(tmp_path, "c", "--stop-after", "2")
    assert not (tmp_path / "c" / "derived.json").exists()
    torch.manual_seed(12345)  # a resumed process starts from other RNG state
    c = _cli_run(tmp_path, "c")
    pa, da = _arch_params(a)
    for other in (b, c):
        po, do = _arch_params(other)
        assert (do["path"], do["blocks"]) == (da["path"], da["blocks"])
        for key in ("alphas", "betas"):
            for x, y in zip(pa[key], po[key]):
                assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-6, rtol=0), key
        assert po["lambda"] == pytest.approx(pa["lambda"], abs=1e-9)
    assert pa["lambda"] != 0.15, "target mode moved lambda"


def test_target_mode_derives_the_most_probable_net_within_the_band():
    s = _searcher(SearchConfig(epochs=1, warmup_epochs=0, batch_size=8))
    with torch.no_grad():
        for m in s.net.mixed_ops:
            m.alpha.normal_()
        for b in s.net.betas:
            b.normal_()
    free = s.derive()
    for factor in (0.8, 1.3, 1.6):
        target = free.predicted_cost * factor
        t = _searcher(SearchConfig.model_validate({"epochs": 1, "warmup_epochs": 0, "batch_size": 8,
                                                   "target_latency": target}))
        t.net.load_state_dict(s.net.state_dict())
        d = t.derive()
        assert abs(d.predicted_cost / target - 1) <= 0.05, (factor, d.predicted_cost, target, d.notes)
        assert not d.notes

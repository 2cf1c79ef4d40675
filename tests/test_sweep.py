"""jobs.sweep: a 2-trial Ray Tune sweep over lambda on 2 CPUs, sharing one warm-up, interrupted by a
failing first trial (the second still runs) and resumed without rerunning the finished trial; each
trial the search, derive and retrain stages' run(); Pareto outputs and MLflow runs.

Tiny on purpose (micro space at 16 px, 4 classes x 40 images, 2 search epochs of which 1 warm-up,
1 retrain epoch): every trial is still two Ray Train jobs, and each costs tens of seconds of start-up
on a loaded 2-core machine, so this test takes minutes, not seconds.
"""
import json

import pytest

from jobs.sweep import SweepConfig, sweep_points, trial_key

ray = pytest.importorskip("ray")


def test_config_and_points():
    cfg = SweepConfig(lambdas=[0.1, 0.5], taus=[10, 20])
    assert [p["key"] for p in sweep_points(cfg)] == ["l0.1_t10", "l0.1_t20", "l0.5_t10", "l0.5_t20"]
    rnd = sweep_points(SweepConfig(mode="random", num_samples=5, seed=3))
    assert len(rnd) == 5 and rnd == sweep_points(SweepConfig(mode="random", num_samples=5, seed=3))
    assert all(0.01 <= p["lambda"] <= 1.0 and 5 <= p["tau"] <= 30 for p in rnd)
    with pytest.raises(ValueError, match="taus must be > 1"):
        SweepConfig(taus=[1.0])
    with pytest.raises(ValueError, match="extra"):
        SweepConfig.model_validate({"lamdas": [0.1]})
    assert trial_key(0.15, 15.0) == "l0.15_t15"
    with pytest.raises(ValueError, match="sweep.evaluation: every trial retrains"):
        SweepConfig.model_validate({"evaluation": "supernet"})
    with pytest.raises(ValueError, match="retrain_epochs"):
        SweepConfig(retrain_epochs=0)
    with pytest.raises(ValueError, match="momentum"):
        SweepConfig(recipe={"momentum": 2.0})
    cfg = SweepConfig(retrain_epochs=2, retrain_lr=0.1, workers_per_trial=2, recipe={"label_smoothing": 0.0})
    rc = cfg.retrain_config()
    assert (rc.epochs, rc.lr, rc.workers, rc.label_smoothing, rc.export, rc.log_model) == (2, 0.1, 2, 0.0, False, False)
    assert cfg.train_recipe().label_smoothing == 0.0 and cfg.train_recipe().epochs == 2


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_two_trial_sweep_interrupted_then_resumed(tmp_path):
    from cluster.storage import open_store
    from densenas.search import SearchConfig
    from jobs.split import SplitConfig
    from jobs.sweep import SweepError
    from tests.standalone import run_split, run_sweep

    split_store = open_store(str(tmp_path / "split"))
    manifest = run_split(SplitConfig(classes=4, max_per_class=40, test_max_per_class=10, val_fraction=0.25,
                                     shard_size=1000, seed=1, executor="local"), split_store)
    search = SearchConfig.model_validate({"epochs": 2, "warmup_epochs": 1, "batch_size": 16, "seed": 3,
                                          "weights": {"lr": 0.05}, "arch": {"lr": 0.01}, "cost": "macs"})
    marker = tmp_path / "trial-0-failed-once"
    cfg = SweepConfig(lambdas=[0.0, 5.0], taus=[15.0], retrain_epochs=1, retrain_batch_size=16,
                      max_concurrent=1, workers_per_trial=1, cpus_per_worker=0.5, data_cpus=1.0,
                      recipe={"latency_repeats": 5, "latency_warmup": 2},
                      fail_trial={"index": 0, "marker": str(marker)})
    store, work = open_store(str(tmp_path / "sweep")), open_store(str(tmp_path / "work"))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kwargs = dict(work_store=work, tracking_uri=tracking, experiment="sweep-test")
    keys = [p["key"] for p in sweep_points(cfg)]

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        with pytest.raises(SweepError, match="(?s)did not finish.*failure drill.*--resume"):
            run_sweep(cfg, "micro_mbconv", search, manifest, split_store, store, **kwargs)
        assert marker.exists(), "the failure drill did not fire"
        done = [k for k in keys if work.exists(f"trials/{k}/result.json")]
        assert done == [keys[1]]      # a failed trial does not stop the ones after it

        out = run_sweep(cfg, "micro_mbconv", search, manifest, split_store, store, resume=True, **kwargs)
    finally:
        ray.shutdown()

    # Finished trials ran once; the interrupted one ran again.
    starts = {k: len(work.list(f"trials/{k}/starts/")) for k in keys}
    assert starts == {keys[0]: 2, keys[1]: 1}
    # One warm-up for every trial, trained once (the search's own job, stopped after epoch 1); each
    # trial's search started from it and trained only epoch 2.
    assert work.exists("warmup/_complete.json") and work.get_json("warmup-run/checkpoints/latest.json")["epoch"] == 1
    for k in keys:
        records = [json.loads(x) for x in work.get_bytes(f"trials/{k}/search/search_record.jsonl").decode().splitlines()]
        assert [r["epoch"] for r in records] == [1, 2] and records[0]["phase"] == "warmup"
        result = work.get_json(f"trials/{k}/result.json")   # searched with its own lambda, not the warm-up's
        assert result["search_metrics"]["lambda"] == pytest.approx(result["lambda"])
        # the retrain stage's outputs: its record and weights, no export
        assert work.exists(f"trials/{k}/retrain/free/model.pt") and not work.exists(f"trials/{k}/retrain/free/model.onnx")

    # Every trial reports test accuracy, predicted + measured latency, params and MACs.
    assert len(out["trials"]) == 2
    for r in out["trials"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["measured_latency_ms"] > 0
        assert r["predicted_latency"] > 0 and r["params"] > 0 and r["macs"] > 0
    assert out["pareto"] and all(store.exists(r["arch_key"]) for r in out["pareto"])
    for key in ("trials.csv", "trials.parquet", "pareto.csv", "pareto.parquet", "pareto.png"):
        assert store.exists(key), key
    import pyarrow.parquet as pq
    table = pq.read_table(str(tmp_path / "sweep" / "pareto.parquet"))
    assert table.num_rows == len(out["pareto"]) and all(table.column("pareto").to_pylist())

    # MLflow: each attempt's stage run holds a run per trial it ran (the resumed one: the trial that
    # failed before); each trial run its search / derive / retrain runs; the last one the Pareto artifacts.
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id])
    children = lambda run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run_id]  # noqa: E731
    stage = [r for r in runs if r.info.run_id == out["mlflow_run_id"]][0]
    trials = children(stage.info.run_id)
    assert [(r.info.run_name, r.info.status) for r in trials] == [(f"trial-{keys[0]}", "FINISHED")]
    fresh = next(r for r in trials if r.info.run_name == f"trial-{keys[0]}")
    assert sorted((r.info.run_name, r.info.status) for r in children(fresh.info.run_id)) == [
        ("derive", "FINISHED"), ("retrain", "FINISHED"), ("search", "FINISHED")]
    assert 0.0 <= fresh.data.metrics["test_top1"] <= 1.0 and fresh.data.metrics["measured_latency_ms"] > 0
    all_trials = [r for r in runs if r.info.run_name.startswith("trial-")]
    assert sorted((r.info.run_name, r.info.status) for r in all_trials) == [
        (f"trial-{keys[0]}", "FAILED"), (f"trial-{keys[0]}", "FINISHED"), (f"trial-{keys[1]}", "FINISHED")]
    names = {a.path for a in client.list_artifacts(stage.info.run_id)}
    assert {"pareto.csv", "pareto.parquet", "pareto.png", "pareto_archs"} <= names

"""jobs.sweep: a 2-trial Ray Tune sweep over lambda on 2 CPUs, sharing one warm-up, interrupted by a
failing first trial (the second still runs) and resumed without rerunning the finished trial; Pareto
outputs and MLflow runs.

Tiny on purpose (micro space at 16 px, 4 classes x 40 images, 2 search epochs of which 1 warm-up,
super-network evaluation; bench/bench_sweep.py covers the retrain path): every trial is still two
Ray Train jobs with Ray Data readers, and each costs tens of seconds of start-up on a loaded 2-core
machine, so this test takes minutes, not seconds (see the report).
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
    assert SweepConfig(retrain_epochs=0).evaluation_mode == "supernet"


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
    cfg = SweepConfig(lambdas=[0.0, 5.0], taus=[15.0], evaluation="supernet", retrain_epochs=1,
                      retrain_batch_size=16, accuracy_split="test", max_concurrent=1, workers_per_trial=1,
                      cpus_per_worker=0.5, data_cpus=1.0, latency_repeats=5,
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
    # One warm-up for every trial: made by the sweep, and each trial's search trained only epoch 2.
    assert work.get_json("warmup/_complete.json")["made_by"] == "sweep"
    for k in keys:
        records = [json.loads(x) for x in work.get_bytes(f"trials/{k}/search/search_record.jsonl").decode().splitlines()]
        assert [r["epoch"] for r in records] == [1, 2] and records[0]["phase"] == "warmup"
        result = work.get_json(f"trials/{k}/result.json")   # searched with its own lambda, not the warm-up's
        assert result["search_metrics"]["lambda"] == pytest.approx(result["lambda"])

    # Every trial reports predicted + measured latency, accuracy, params and MACs.
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

    # MLflow: a parent run, a nested run per trial attempt, the Pareto artifacts on the parent.
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == out["mlflow_parent_run_id"]][0]
    assert parent.info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.status for r in trials) == ["FAILED", "FINISHED", "FINISHED"]
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.csv", "pareto.parquet", "pareto.png", "pareto_archs"} <= names

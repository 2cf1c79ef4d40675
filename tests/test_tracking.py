"""cluster.tracking against a real MLflow server (artifacts in SeaweedFS) and a local SQLite file."""
from __future__ import annotations

import json
import time
import uuid

import pytest

from cluster.tracking import (
    REDACTED,
    TAG_FINGERPRINT,
    TAG_GIT_COMMIT,
    TAG_RUN_ID,
    Tracker,
    flatten_config,
    rank0_tracker,
    redact_params,
    resolve_tracking_uri,
    standard_tags,
)
from tests.fixtures_stack import *  # noqa: F401,F403 -- session fixtures (stack_s3, stack_mlflow)
from tests.fixtures_stack import TcpProxy

pytestmark = pytest.mark.timeout(240)

SECRET = "sk-" + "Zq8" * 12


def test_flatten_and_redact(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value-123")
    config = {
        "search": {"lr": 0.01, "ops": ["mbconv_k3_e3", "skip"], "layers": [{"w": 16}, {"w": 24}]},
        "store": {"uri": "s3://densenas/artifacts", "endpoint": "http://admin:hunter2@127.0.0.1:9000/x",
                  "aws_secret_access_key": SECRET, "access_key_id": "AKIAEXAMPLE"},
        "mlflow": {"password": SECRET, "api_token": SECRET, "uri": "https://h/x?X-Amz-Signature=abcdef&y=1"},
        "note": "copied env-secret-value-123 by mistake",
        "empty": {},
    }
    flat = flatten_config(config)
    assert flat["search.lr"] == 0.01 and flat["search.ops"] == '["mbconv_k3_e3", "skip"]'
    assert flat["search.layers.1.w"] == 24 and flat["empty"] == "{}"
    params = redact_params(flat)
    text = json.dumps(params)
    for secret in (SECRET, "hunter2", "abcdef", "env-secret-value-123", "AKIAEXAMPLE"):
        assert secret not in text
    assert params["store.endpoint"] == f"http://{REDACTED}@127.0.0.1:9000/x"
    assert params["store.uri"] == "s3://densenas/artifacts"  # non-secret values untouched
    assert params["search.lr"] == "0.01"


def test_tags_carry_run_fingerprint_and_commit():
    tags = standard_tags(run_id="r1", stage="search", fingerprint="f" * 16)
    assert tags[TAG_RUN_ID] == "r1" and tags[TAG_FINGERPRINT] == "f" * 16
    assert len(tags[TAG_GIT_COMMIT].split("+")[0]) in (40, 7) or tags[TAG_GIT_COMMIT] == "unknown"


def test_without_configuration_uses_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DENSENAS_TRACKING_DIR", str(tmp_path / "tracking"))
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"
    # a directory (MLflow's refused file store) becomes a SQLite file inside it
    assert resolve_tracking_uri(str(tmp_path / "mlruns")) == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"

    tracker = Tracker(experiment="bare")
    with tracker.run("pipeline") as parent:
        with tracker.run("split", parent=parent) as stage:
            stage.log_metrics({"n": 3}, step=0)
    assert tracker.spooled == 0 and tracker.dropped == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracker.uri)
    run = client.get_run(stage.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.data.metrics["n"] == 3
    assert (tmp_path / "tracking" / "mlflow.db").exists()


def test_nested_runs_metrics_and_artifacts_in_s3(stack_mlflow, tmp_path):
    tracker = Tracker(stack_mlflow.mlflow_uri, experiment=f"t-{uuid.uuid4().hex[:6]}", spool_dir=tmp_path / "spool")
    parent = tracker.start_run("pipeline", tags=standard_tags(run_id="run-42"))
    tracker.log_config({"search": {"epochs": 2}, "store": {"secret_key": SECRET,
                                                          "endpoint": f"http://u:{SECRET}@h:1/"}})
    with tracker.run("search", parent=parent, tags=standard_tags(stage="search", fingerprint="abc")) as stage:
        for epoch in range(3):
            stage.log_metrics({"loss": 1.0 / (epoch + 1), "acc": 0.1 * epoch}, step=epoch)
        artifact = tmp_path / "arch.json"
        artifact.write_text('{"blocks": [1, 2]}')
        stage.log_artifact(artifact)
    trial = tracker.start_run("trial-0", parent=parent, tags={"densenas.trial": "0"})
    trial.log_metrics({"latency_ms": 3.5}, step=0)
    trial.end("FINISHED")
    tracker.end_run("FINISHED")
    assert tracker.spooled == 0 and tracker.dropped == 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack_mlflow.mlflow_uri)
    search = client.get_run(stage.run_id)
    assert search.data.tags["mlflow.parentRunId"] == parent.run_id
    assert search.data.tags[TAG_FINGERPRINT] == "abc" and search.info.status == "FINISHED"
    history = client.get_metric_history(stage.run_id, "loss")
    assert [(m.step, round(m.value, 3)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.333)]
    assert client.get_run(trial.run_id).data.tags["mlflow.parentRunId"] == parent.run_id

    params = client.get_run(parent.run_id).data.params
    assert params["search.epochs"] == "2" and SECRET not in json.dumps(params)
    assert client.get_run(parent.run_id).data.tags[TAG_RUN_ID] == "run-42"

    # the artifact went through the server's proxy into the S3 bucket
    assert [a.path for a in client.list_artifacts(stage.run_id)] == ["arch.json"]
    s3 = stack_mlflow._s3_client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="densenas", Prefix="mlflow-artifacts/").get("Contents", [])]
    assert any(k.endswith(f"{stage.run_id}/artifacts/arch.json") for k in keys), keys


def test_outage_is_buffered_and_sent_later(stack_mlflow, tmp_path):
    """A network outage between the trainer and MLflow: nothing raises, the work goes to the
    spool, and flush() delivers it (with the original steps) once the path is back."""
    proxy = TcpProxy(stack_mlflow.ports.mlflow)
    try:
        tracker = Tracker(proxy.url, experiment=f"outage-{uuid.uuid4().hex[:6]}",
                          spool_dir=tmp_path / "spool", retry_interval_s=0.5)
        parent = tracker.start_run("pipeline")
        stage = tracker.start_run("search", parent=parent)
        stage.log_metrics({"loss": 1.0}, step=0)
        assert tracker.spooled == 0

        proxy.cut()
        started = time.monotonic()
        stage.log_metrics({"loss": 0.5}, step=1)         # the server is gone: buffered, no exception
        late = tracker.start_run("derive", parent=parent)  # even a run created while offline
        late.log_metrics({"params_m": 4.2}, step=0)
        artifact = tmp_path / "ckpt.txt"
        artifact.write_text("epoch 1")
        stage.log_artifact(artifact)
        stage.end("FINISHED")
        assert time.monotonic() - started < 60
        assert tracker.spooled >= 5 and not tracker.flush()  # still down: stays spooled
        artifact.unlink()  # the spool kept its own copy

        proxy.restore()
        time.sleep(0.6)
        assert tracker.flush() and tracker.spooled == 0
        late.end("FINISHED")
        tracker.end_run("FINISHED", run=parent)
        assert tracker.spooled == 0 and tracker.dropped == 0
    finally:
        proxy.close()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack_mlflow.mlflow_uri)
    history = client.get_metric_history(stage.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5)]
    assert client.get_run(stage.run_id).info.status == "FINISHED"
    derived = client.get_run(late.run_id)
    assert derived.data.tags["mlflow.parentRunId"] == parent.run_id and derived.data.metrics["params_m"] == 4.2
    assert [a.path for a in client.list_artifacts(stage.run_id)] == ["ckpt.txt"]


def test_rank0_helper(stack_mlflow, tmp_path):
    tracker = Tracker(stack_mlflow.mlflow_uri, experiment="rank0", spool_dir=tmp_path / "spool")
    parent = tracker.start_run("pipeline")
    spec = tracker.spec(parent)
    worker_tracker, worker_run = rank0_tracker(spec, "search", rank=1)
    worker_run.log_metrics({"loss": 1.0}, step=0)  # inert on non-zero ranks
    assert worker_run.run_id is None
    rank0, run = rank0_tracker(spec, "search", rank=0)
    run.log_metrics({"loss": 1.0}, step=0)
    rank0.end_run("FINISHED")
    tracker.end_run("FINISHED")
    from mlflow.tracking import MlflowClient

    assert MlflowClient(stack_mlflow.mlflow_uri).get_run(run.run_id).data.tags["mlflow.parentRunId"] == parent.run_id


# --------------------------------------------------------------------------- curves, registry, parent reuse
def _sqlite(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_epoch_curves_resume_logs_each_epoch_once(tmp_path):
    """A worker group restarted from a checkpoint catches up what the run lacks, and no epoch twice."""
    from jobs.epochs import EpochCurves, search_epoch_metrics

    tracker = Tracker(_sqlite(tmp_path), experiment="curves", spool_dir=tmp_path / "spool")
    stage = tracker.start_run("search")
    spec = tracker.spec(run=stage)
    records = [{"epoch": e, "val_acc": 0.1 * e, "seconds": 2.0, "derived": {"path_prob": 0.5}, "phase": "search"}
               for e in (1, 2, 3, 4)]
    first = EpochCurves(spec, search_epoch_metrics, rank=0, stage="search", total=4)
    assert [first.log(r) for r in records[:2]] == [True, True]
    first.close()
    # the restarted rank 0: its checkpoint holds epochs 1-3 (epoch 3 finished but was never logged)
    second = EpochCurves(spec, search_epoch_metrics, rank=0)
    assert second.catch_up(records[:3]) == 1 and second.log(records[3]) and not second.log(records[3])
    second.close()
    inert = EpochCurves(spec, search_epoch_metrics, rank=1)
    assert not inert.active and not inert.log(records[0])
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracker.uri).get_metric_history(stage.run_id, "val_acc")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert MlflowClient(tracker.uri).get_metric_history(stage.run_id, "path_prob")[0].value == 0.5


def test_parent_reused_by_a_rerun_and_summary_forwarded(tmp_path):
    from cluster.run_tracking import PipelineTracker

    uri = _sqlite(tmp_path)
    first = PipelineTracker(uri, "reuse", "r1", config={"search": {"lambda": 0.1}})
    search = first.stage("search", "fp1")
    for epoch in (1, 2):
        search.log_metrics({"val_acc": 0.2 * epoch}, step=epoch)
    search.log_metrics({"val_acc": 0.4, "search_seconds": 12.5})   # the runner's summary: no step
    search.log_summary(tags={"densenas.arch": "16 | 24:k3e3"})
    search.log_dataset("fmnist-10cls", "d" * 40, "file:///x/split", profile={"counts": {"train": 8}})
    search.end()
    first.end()
    again = PipelineTracker(uri, "reuse", "r1", config={"search": {"lambda": 0.1}})
    again.end()
    other = PipelineTracker(uri, "reuse", "r1", config={"search": {"lambda": 0.3}})
    other.end()
    assert again.reused and again.run_id == first.run_id and not other.reused and other.run_id != first.run_id

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(search.run_id, "val_acc")] == [1, 2]
    parent = client.get_run(first.run_id)
    assert parent.data.metrics["search_seconds"] == 12.5 and parent.data.metrics["search_val_acc"] == 0.4
    assert parent.data.tags["densenas.arch"] == "16 | 24:k3e3" and parent.data.tags["densenas.reruns"] == "1"
    assert parent.info.status == "FINISHED"
    (dataset,) = parent.inputs.dataset_inputs
    assert dataset.dataset.name == "fmnist-10cls" and len(dataset.dataset.digest) <= 36


def test_register_model_version_after_its_artifacts(tmp_path):
    from cluster.tracking import registered_model_name

    tracker = Tracker(_sqlite(tmp_path), experiment="reg", spool_dir=tmp_path / "spool")
    run = tracker.start_run("retrain")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "arch.json").write_text("{}")
    run.log_artifact(folder, "model")
    name = registered_model_name("reg")
    tracker.register_model(name, "model", {"densenas.arch": "16 | 24"}, run=run)
    tracker.register_model(name, "model", {"densenas.arch": "16 | 24"}, run=run)
    run.end()
    assert tracker.dropped == 0
    from mlflow.tracking import MlflowClient

    versions = MlflowClient(tracking_uri=tracker.uri, registry_uri=tracker.uri).search_model_versions(
        f"name='{name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2] and {v.run_id for v in versions} == {run.run_id}
    assert all(v.source.endswith("/model") and v.tags["densenas.arch"] == "16 | 24" for v in versions)


def test_search_evolution_plot(tmp_path):
    from jobs.diagrams import search_evolution

    snaps = [{"epoch": e, "phase": "warmup" if e == 1 else "search", "labels": ["head (0, 1)", "stack 1"],
              "alphas": [[0.5, 0.5], [0.2 + 0.1 * e, 0.8 - 0.1 * e]],
              "edge_probs": {"0-1": 0.5, "0-2": 0.5, "1-3": 1.0, "2-3": 1.0}, "path": [0, 1]} for e in (1, 2, 3)]
    out = search_evolution(snaps, tmp_path / "evolution.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000

"""What a user finds in MLflow after the tiny pipeline, asked of the real MLflow server of the local stack.

One module fixture runs ``pipeline/run.py`` (configs/tiny.yaml shrunk by the e2e test's overrides, a
local Ray, a local store, the stack's MLflow server with its artifacts in SeaweedFS) and then the same
command again, fully cached. The tests read the server through its API:

- the search run's ``val_acc`` history has exactly one point per epoch (step = epoch), logged by
  rank 0 of the Train workers through cluster.tracking; the retrain run has its loss curve too;
- the derive run lists its three PNGs, the search run its evolution plot, the profile run its scatter;
- the registry holds a version of the experiment's model, from the retrain run, tagged with the arch
  string and the test top-1, whose ``mlflow.pyfunc`` model reproduces the retrain's logits (the
  state dict in the store, rebuilt from arch.json);
- the parent run carries the summary (arch tag, test top-1, measured latency, search time) and the
  split as a dataset input; the cached rerun adds no second parent;
- the console of a successful run shows no worker result dicts and no traceback.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.test_e2e_pipeline import TEST_OVERRIDES

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline/run.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_runs(stack_mlflow, tmp_path_factory):
    """(MlflowClient, experiment, run id, store dir, first and second process) of the tiny pipeline, run twice."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("mlflow-runs")
    experiment = f"runs-{uuid.uuid4().hex[:8]}"
    run_id = "tiny-mlflow"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "DENSENAS_"))}
    env.update(DENSENAS_STORE=str(tmp / "store"), MLFLOW_TRACKING_URI=stack_mlflow.mlflow_uri,
               DENSENAS_TRACKING_DIR=str(tmp / "tracking"), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    args = ["--config", "configs/tiny.yaml", "--run-id", run_id,
            *[a for o in [*TEST_OVERRIDES, f"tracking.experiment={experiment}"] for a in ("--set", o)]]
    first = _run(args, env)
    (tmp / "console-first.txt").write_text(first.stdout + "\n--- stderr ---\n" + first.stderr)  # for a look
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-6000:]
    second = _run(args, env, timeout=300)
    (tmp / "console-second.txt").write_text(second.stdout + "\n--- stderr ---\n" + second.stderr)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return MlflowClient(stack_mlflow.mlflow_uri), experiment, run_id, tmp / "store", first, second


def _runs(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=200)


def _stage_run(client, experiment: str, stage: str):
    runs = [r for r in _runs(client, experiment) if r.data.tags.get("densenas.stage") == stage]
    assert len(runs) == 1, f"{len(runs)} {stage} runs"
    return runs[0]


def _search_epochs() -> int:
    return int(next(o.split("=")[1] for o in TEST_OVERRIDES if o.startswith("search.epochs=")))


def test_search_curves_one_point_per_epoch(tiny_runs):
    client, experiment, *_ = tiny_runs
    search = _stage_run(client, experiment, "search")
    epochs = _search_epochs()
    for key in ("val_acc", "train_loss", "expected_latency", "alpha_entropy", "beta_entropy", "lr", "path_prob",
                "epoch_seconds"):
        history = client.get_metric_history(search.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), (key, [m.step for m in history])
    retrain = _stage_run(client, experiment, "retrain")
    assert [m.step for m in client.get_metric_history(retrain.info.run_id, "train_loss")] == [1]
    assert [m.step for m in client.get_metric_history(retrain.info.run_id, "img_per_s")] == [1]
    profile = _stage_run(client, experiment, "profile")
    assert client.get_metric_history(profile.info.run_id, "signatures_fraction")[-1].value == 1.0


def test_stage_runs_list_their_pictures(tiny_runs):
    client, experiment, *_ = tiny_runs

    def listed(stage: str) -> set[str]:
        return {a.path for a in client.list_artifacts(_stage_run(client, experiment, stage).info.run_id)}

    assert {"path_diagram.png", "alpha_heatmap.png", "beta_heatmap.png"} <= listed("derive")
    assert "search_evolution.png" in listed("search")
    assert "latency_scatter.png" in listed("profile")


def test_registry_version_reproduces_the_retrain_logits(tiny_runs):
    import mlflow
    import mlflow.artifacts
    import mlflow.pyfunc
    import torch

    from cluster.storage import open_store
    from cluster.tracking import TAG_ARCH, registered_model_name
    from densenas.arch import build_model, load_arch

    client, experiment, run_id, store_dir, *_ = tiny_runs
    retrain = _stage_run(client, experiment, "retrain")
    name = registered_model_name(experiment)
    versions = client.search_model_versions(f"name='{name}'")
    assert [v.run_id for v in versions] == [retrain.info.run_id]
    version = versions[0]
    assert version.tags[TAG_ARCH] and float(version.tags["test_top1"]) == pytest.approx(
        retrain.data.metrics["test_top1"], rel=1e-4)
    assert "measured_latency_ms" in version.tags
    assert {"model", "onnx"} <= {a.path for a in client.list_artifacts(retrain.info.run_id)}

    store = open_store(str(store_dir)).child(f"runs/{run_id}/retrain")
    arch = load_arch(store.get_bytes("arch.json").decode())
    model = build_model(arch, num_classes=arch.num_classes)
    model.load_state_dict(torch.load(io.BytesIO(store.get_bytes("model.pt")), map_location="cpu"))
    model.eval()
    x = torch.randn(3, arch.in_channels, arch.input_size, arch.input_size)
    with torch.no_grad():
        expected = model(x).numpy()
    # Through the registry's download URI into a local folder: no process-global tracking or registry
    # URI is set, so later tests keep their own servers.
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(name, version.version),
        dst_path=str(store_dir.parent / "served"), tracking_uri=client.tracking_uri)
    served = mlflow.pyfunc.load_model(local)
    got = np.asarray(served.predict(x.numpy()))
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4


def test_parent_summary_and_no_empty_parent_on_a_cached_rerun(tiny_runs):
    client, experiment, run_id, store_dir, first, second = tiny_runs
    parents = [r for r in _runs(client, experiment) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [(p.info.run_name, p.info.status) for p in parents]
    parent = parents[0]
    assert parent.data.tags["densenas.run_id"] == run_id and parent.data.tags["densenas.reruns"] == "1"
    assert parent.info.status == "FINISHED"
    for key in ("test_top1", "measured_latency_ms", "search_seconds"):
        assert key in parent.data.metrics, sorted(parent.data.metrics)
    derive_manifest = json.loads((store_dir / "runs" / run_id / "derive" / "manifest.json").read_text())
    assert parent.data.tags["densenas.arch"] == derive_manifest["one_line"]
    children = [r for r in _runs(client, experiment) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["densenas.stage"] for r in children) == ["derive", "profile", "retrain", "search",
                                                                       "split"]
    datasets = parent.inputs.dataset_inputs
    assert len(datasets) == 1 and json.loads(datasets[0].dataset.profile)["counts"]["train"] > 0
    assert "cached" in second.stdout


def test_console_is_quiet_on_success(tiny_runs):
    *_, first, second = tiny_runs
    text = first.stdout + first.stderr
    assert "TrainingReport(" not in text, text[-4000:]
    # Ray Train's PlacementGroupCleaner actor looks its cluster up by auto-detection; on a host where
    # other Ray clusters run too (shared dev / CI machines) its monitor thread dies with "Found
    # multiple active Ray instances". On an overloaded host Ray Train's controller logs its resource
    # request's GetTimeoutError with a traceback and retries ("safe to ignore", Ray says). Those are
    # the host, not this run: every other traceback fails.
    host_noise = ("Found multiple active Ray instances", "autoscaling_coordinator_client.py")
    blocks = text.split("Traceback (most recent call last):")[1:]
    unexplained = [b[:2000] for b in blocks if not any(n in b[:6000] for n in host_noise)]
    assert not unexplained, unexplained[0]
    assert "View run" not in text and "INFO mlflow" not in text
    assert "tqdm is not installed" not in text
    assert "[search] epoch 1/" in text and "ETA" in text
    assert "UserWarning" not in text, [line for line in text.splitlines() if "UserWarning" in line]

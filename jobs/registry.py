"""What a run is made of, in MLflow: its data (a dataset input) and its model (the Model Registry).

- ``log_split_dataset(ctx, manifest, store)``: the split stage's shards as an MLflow dataset input
  (name, digest over the shard checksums, the store URI, counts and classes as its profile) on the
  split run and on the pipeline's parent run.
- ``log_retrained_model(ctx, model, arch, store, metrics, example)``: the retrained network as an
  MLflow PyTorch model (``model/``: torch.export program, signature and input example, loadable with
  ``mlflow.pyfunc.load_model``), the ONNX export beside it (``onnx/``), and a
  new version of the experiment's registered model (``cluster.tracking.registered_model_name``: one
  registered model per experiment, a version per run), tagged with the arch string, the measured and
  predicted latency and the test top-1.
- ``register_pareto_front(tracker, front, ...)``: the sweep's Pareto-front networks as versions of
  the same registered model (``densenas.source=sweep``; architecture only: a sweep trial keeps no
  trained weights, so these versions hold ``arch.json`` and are retrained before serving).

Everything goes through ``ctx.tracker`` (cluster.tracking: spooled when MLflow is down, the
registration queued after its artifacts). Nothing here raises into a stage: a model that cannot be
written for MLflow is reported and the stage goes on (the store keeps model.pt / model.ts / model.onnx).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from cluster.tracking import TAG_ARCH, registered_model_name

__all__ = ["log_split_dataset", "log_retrained_model", "register_pareto_front", "MODEL_PATH", "ONNX_PATH",
           "pyfunc_uri"]

MODEL_PATH = "model"       # the MLflow model's artifact path in the retrain run
ONNX_PATH = "onnx"         # the ONNX export beside it
REPO = Path(__file__).resolve().parent.parent


def _say(ctx: Any, msg: str) -> None:
    progress = getattr(ctx, "progress", None)
    (progress if callable(progress) else (lambda m: print(m, flush=True)))(msg)


def log_split_dataset(ctx: Any, manifest: Mapping[str, Any], store: Any) -> None:
    """The split as a dataset input of the split run and the parent run (MLflow's Datasets panel)."""
    if not ctx.tracker.enabled:
        return
    try:
        shards = manifest.get("shards") or {}
        h = hashlib.sha256()
        for split in sorted(shards):
            for rec in shards[split]:
                h.update(f"{rec.get('key')}:{rec.get('sha256')}\n".encode())
        counts = manifest.get("counts") or {}
        name = f"{manifest.get('dataset', 'dataset')}-{manifest.get('num_classes', '?')}cls"
        ctx.tracker.log_dataset(name, h.hexdigest()[:36], store.uri_for(""),
                                schema={"image": f"{manifest.get('channels')}x{manifest.get('image_size')} uint8",
                                        "label": "int64"},
                                profile={"counts": counts, "classes": manifest.get("classes"),
                                         "shards": {s: len(v) for s, v in shards.items()},
                                         "normalization": manifest.get("normalization")})
    except Exception as e:  # noqa: BLE001 -- tracking never fails a stage
        _say(ctx, f"tracking: split dataset not logged ({type(e).__name__}: {e})")


def pyfunc_uri(model_name: str, version: int | str) -> str:
    return f"models:/{model_name}/{version}"


def _model_tags(arch: Any, metrics: Mapping[str, Any]) -> dict[str, str]:
    tags = {TAG_ARCH: arch.one_line()}
    for key in ("test_top1", "test_top5", "measured_latency_ms", "predicted_latency_ms"):
        if metrics.get(key) is not None:
            tags[key] = f"{float(metrics[key]):.6g}"
    return tags


def _save_pytorch_model(model: Any, model_dir: Path, signature: Any, example: Any, arch: Any) -> None:
    """``torch.export`` format (pt2: no pickle, no project code needed to load; the example's batch of 2
    keeps the batch dimension dynamic); a network torch.export cannot trace falls back to a pickled
    module with ``densenas/`` bundled as its code."""
    import shutil

    import mlflow.pytorch
    import torch

    common = dict(signature=signature, input_example=example.numpy(),
                  pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
                  metadata={"arch": arch.one_line(), "num_classes": int(arch.num_classes)})
    try:
        mlflow.pytorch.save_model(model, str(model_dir), serialization_format="pt2", **common)
    except Exception as e:  # noqa: BLE001 -- not every op traces; pickle always works
        print(f"tracking: torch.export of the model failed ({type(e).__name__}: {str(e)[:200]}); "
              "saving it pickled with densenas/ as code", flush=True)
        shutil.rmtree(model_dir, ignore_errors=True)
        mlflow.pytorch.save_model(model, str(model_dir), serialization_format="pickle",
                                  code_paths=[str(REPO / "densenas")], **common)


def log_retrained_model(ctx: Any, model: Any, arch: Any, store: Any, metrics: Mapping[str, Any],
                        example: Any) -> str | None:
    """Log the retrained network as an MLflow model (+ ONNX) and register a new version; returns the
    registered model's name (None without tracking or when it could not be written)."""
    tracker = ctx.tracker
    if not tracker.enabled:
        return None   # tracking off (a run created while MLflow is down still gets it: the spool keeps the order)
    try:
        import torch
        from mlflow.models import infer_signature

        model = model.eval()
        with torch.no_grad():
            logits = model(example)
        signature = infer_signature(example.numpy(), logits.numpy())
        name = registered_model_name(tracker.experiment)
        with tempfile.TemporaryDirectory(prefix="densenas-mlflow-model-") as tmp:
            model_dir = Path(tmp) / MODEL_PATH
            _save_pytorch_model(model, model_dir, signature, example, arch)
            (model_dir / "arch.json").write_text(arch.to_json())
            tracker.log_artifact(model_dir, MODEL_PATH)
            if store.exists("model.onnx"):
                onnx_dir = Path(tmp) / ONNX_PATH
                onnx_dir.mkdir()
                (onnx_dir / "model.onnx").write_bytes(store.get_bytes("model.onnx"))
                tracker.log_artifact(onnx_dir, ONNX_PATH)
            tracker.register_model(name, MODEL_PATH, _model_tags(arch, metrics),
                                   description=f"retrained {arch.one_line()}")
        _say(ctx, f"retrain: MLflow model logged ({MODEL_PATH}/, {ONNX_PATH}/) and registered as a version of {name}")
        return name
    except Exception as e:  # noqa: BLE001 -- tracking never fails a stage
        _say(ctx, f"tracking: MLflow model not logged ({type(e).__name__}: {e}); the store keeps model.pt/.ts/.onnx")
        return None


def register_pareto_front(tracker: Any, front: Sequence[Mapping[str, Any]], latency_key: str) -> int:
    """Register each Pareto-front net of a sweep (its ``arch`` document) as a version; returns how many.

    ``tracker`` is a stage facade or a ``(cluster.tracking.Tracker, RunHandle)`` pair."""
    if isinstance(tracker, tuple):
        base, run = tracker
        log_artifact = lambda path, ap: base.log_artifact(path, ap, run=run)  # noqa: E731
        register = lambda n, ap, tags, d: base.register_model(n, ap, tags, d, run=run)  # noqa: E731
        experiment = base.experiment
    else:
        if not tracker.enabled:
            return 0
        log_artifact, experiment = tracker.log_artifact, tracker.experiment
        register = lambda n, ap, tags, d: tracker.register_model(n, ap, tags, d)  # noqa: E731
    name = registered_model_name(experiment)
    count = 0
    with tempfile.TemporaryDirectory(prefix="densenas-front-") as tmp:
        for row in front:
            cand = str(row.get("candidate", count)).replace("/", "__")
            folder = Path(tmp) / cand
            folder.mkdir()
            (folder / "arch.json").write_text(json.dumps(row.get("arch"), indent=1, default=str))
            artifact_path = f"pareto_front/{cand}"
            log_artifact(folder, artifact_path)
            tags = {TAG_ARCH: row.get("one_line", ""), "densenas.source": "sweep", "weights": "none (retrain first)",
                    "accuracy": f"{float(row['accuracy']):.6g}" if row.get("accuracy") is not None else "",
                    latency_key: f"{float(row[latency_key]):.6g}" if row.get(latency_key) is not None else "",
                    "lambda": row.get("lambda"), "tau": row.get("tau")}
            register(name, artifact_path, {k: v for k, v in tags.items() if v not in (None, "")},
                     f"sweep Pareto-front net {cand} (architecture only)")
            count += 1
    return count

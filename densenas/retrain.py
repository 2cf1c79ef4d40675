"""Retraining a derived network: the pieces of the paper's recipe, evaluation, latency, export.

Pure PyTorch (no Ray): ``jobs.retrain`` runs these inside Ray Train workers, and a notebook or a
single-process script can use them unchanged::

    recipe = TrainRecipe(epochs=5, batch_size=64, lr=0.05)
    model = build_model(arch, num_classes=10)
    opt = build_optimizer(model, recipe)
    sched = build_scheduler(opt, recipe, steps_per_epoch=len(loader))
    for epoch in range(recipe.epochs):
        train_epoch(model, loader, opt, sched, recipe)
    print(evaluate(model, test_loader))                    # {"top1", "top5", "loss", "n"}
    print(measure_latency(model, (1, 1, 32, 32)))          # densenas.profiling's timing method
    export_torchscript(model, example, "model.ts"); export_onnx(model, example, "model.onnx")
    check_exports(model, example, "model.ts", "model.onnx")   # max |difference| per format

Recipe defaults are the paper's ImageNet retraining (DenseNAS sec. 4.1): SGD momentum 0.9,
weight decay 4e-5, label smoothing 0.1, cosine learning rate per step, 240 epochs, batch 1024,
lr 0.5. Weight decay is not applied to BatchNorm parameters and biases (``no_bn_decay``, as in the
authors' code and timm); turn it off to decay every parameter.

``RetrainState`` (``retrain_state_dict``/``load_retrain_state``) is what a checkpoint holds: model,
optimizer, scheduler, epoch, step, per-epoch history.
"""
from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

__all__ = [
    "TrainRecipe",
    "RETRAIN_STATE_FORMAT",
    "param_groups",
    "build_optimizer",
    "build_scheduler",
    "label_smoothing_loss",
    "topk_correct",
    "train_epoch",
    "evaluate",
    "measure_latency",
    "export_torchscript",
    "export_onnx",
    "check_exports",
    "retrain_state_dict",
    "load_retrain_state",
    "state_to_bytes",
    "state_from_bytes",
]

RETRAIN_STATE_FORMAT = "densenas-retrain-state/1"
GradSync = Callable[[list[Tensor]], None]


class TrainRecipe(BaseModel):
    """How a derived network is trained from scratch. Defaults: the paper's ImageNet recipe."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(240, ge=1, description="paper: 240")
    batch_size: int = Field(1024, ge=1, description="global batch (split across workers); paper: 1024")
    lr: float = Field(0.5, gt=0, description="peak learning rate for the global batch; paper: 0.5")
    lr_min: float = Field(0.0, ge=0, description="cosine floor")
    warmup_epochs: float = Field(0.0, ge=0, description="linear lr warm-up before the cosine (0: none)")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(4e-5, ge=0)
    no_bn_decay: bool = Field(True, description="no weight decay on BatchNorm parameters and biases")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0, description="max global grad norm; None: no clipping")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout before the classifier")

    @model_validator(mode="after")
    def _lr_order(self) -> "TrainRecipe":
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min ({self.lr_min}) must not exceed lr ({self.lr})")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs})")
        return self


# --------------------------------------------------------------------------- optimizer / schedule / loss
def param_groups(model: nn.Module, weight_decay: float, no_bn_decay: bool = True) -> list[dict]:
    """Two groups: decayed weights, and (``no_bn_decay``) BatchNorm parameters + biases without decay."""
    if not no_bn_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))
            (no_decay if is_norm or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.SGD:
    return torch.optim.SGD(param_groups(model, recipe.weight_decay, recipe.no_bn_decay), lr=recipe.lr,
                           momentum=recipe.momentum, nesterov=recipe.nesterov)


class _WarmupCosine:
    """LambdaLR factor per step: linear warm-up to 1, then cosine to lr_min/lr (a picklable object)."""

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float):
        self.total, self.warmup, self.min_ratio = max(1, int(total_steps)), int(warmup_steps), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(step - self.warmup, self.total - self.warmup) / max(1, self.total - self.warmup)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: TrainRecipe,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine per step over ``epochs * steps_per_epoch`` steps (after the optional linear warm-up)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}; is the training set "
                         "smaller than one batch per worker?")
    total = recipe.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, _WarmupCosine(total, round(recipe.warmup_epochs * steps_per_epoch), recipe.lr_min / recipe.lr))


def label_smoothing_loss(logits: Tensor, target: Tensor, smoothing: float = 0.1) -> Tensor:
    """Cross-entropy against (1 - smoothing) one-hot + smoothing uniform (the paper's 0.1)."""
    return F.cross_entropy(logits, target, label_smoothing=smoothing)


def topk_correct(logits: Tensor, target: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at the classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(target.view(-1, 1))
    return {k: int(hit[:, :min(k, kmax)].any(dim=1).sum()) for k in ks}


# --------------------------------------------------------------------------- train / evaluate
def _thread_page_faults() -> int | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    except (ImportError, AttributeError, OSError):
        return None


def train_epoch(model: nn.Module, batches: Iterable[Sequence[Tensor]], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None, recipe: TrainRecipe,
                device: str | torch.device = "cpu", grad_sync: GradSync | None = None,
                max_steps: int | None = None, log: Callable[[str], None] | None = None,
                log_every: int = 0) -> dict:
    """One pass of SGD over ``batches``; ``grad_sync`` averages gradients across ranks (data parallel).

    ``max_steps`` caps the steps (the remaining batches are still consumed: data-parallel ranks must
    take the same number of steps, and a streaming split must be drained). Returns loss/acc/n/steps/seconds/lr,
    cpu_seconds (CPU time of the calling thread: seconds minus it is time spent waiting) and page_faults
    (the thread's minor page faults: memory the allocator gave back and took again; None off Linux).
    """
    device = torch.device(device)
    model.train()
    t0, cpu0, faults0 = time.perf_counter(), time.thread_time(), _thread_page_faults()
    loss_sum, correct, n, steps = 0.0, 0, 0, 0
    params = [p for p in model.parameters() if p.requires_grad]
    for batch in batches:
        if max_steps is not None and steps >= max_steps:
            continue
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = label_smoothing_loss(logits, y, recipe.label_smoothing)
        loss.backward()
        if grad_sync is not None:
            grad_sync([p.grad if p.grad is not None else p.new_zeros(p.shape) for p in params])
        if recipe.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        steps += 1
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        n += len(y)
        if log is not None and log_every and steps % log_every == 0:
            log(f"  step {steps}: loss {loss_sum / n:.4f} acc {correct / n:.3f}")
    return {"loss": loss_sum / n if n else None, "acc": correct / n if n else None, "n": n, "steps": steps,
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.thread_time() - cpu0,
            "page_faults": None if faults0 is None else _thread_page_faults() - faults0,
            "lr": optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Sequence[Tensor]], device: str | torch.device = "cpu",
             reduce: Callable[[Tensor], Tensor] | None = None) -> dict:
    """Top-1 / top-5 accuracy and mean cross-entropy (no smoothing) of ``model`` in eval mode.

    ``reduce`` sums the counts across ranks (e.g. an all-reduce), so each rank may evaluate its own
    shard and all get the global numbers.
    """
    device = torch.device(device)
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top1, top5, n
    for batch in batches:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        logits = model(x)
        hits = topk_correct(logits, y, (1, 5))
        sums += torch.tensor([float(F.cross_entropy(logits, y, reduction="sum")), hits[1], hits[5], len(y)],
                             dtype=torch.float64)
    if reduce is not None:
        sums = reduce(sums)
    n = float(sums[3])
    if n == 0:
        return {"top1": None, "top5": None, "loss": None, "n": 0}
    return {"top1": float(sums[1]) / n, "top5": float(sums[2]) / n, "loss": float(sums[0]) / n, "n": int(n)}


# --------------------------------------------------------------------------- latency
def measure_latency(model: nn.Module, input_shape: Sequence[int], device: str | torch.device = "cpu",
                    warmup: int = 10, repeats: int = 50, threads: int | None = None) -> dict:
    """Real latency of the whole network: eval, ``no_grad``, the timing method of
    ``densenas.profiling`` (perf_counter on CPU, CUDA events on GPU). Returns the robust stats in ms
    plus what they were measured on (``device``, ``threads``, ``batch``)."""
    from densenas.profiling import device_fingerprint, measure_model_stats, set_cpu_threads

    device = torch.device(device)
    if device.type == "cpu" and threads is not None:
        set_cpu_threads(threads)
    stats = measure_model_stats(model, input_shape, device=device, warmup=warmup, repeats=repeats)
    out = stats.to_dict() if hasattr(stats, "to_dict") else dict(vars(stats))
    out.update(units="ms", batch=int(input_shape[0]),
               device=device_fingerprint(device, threads=torch.get_num_threads(), batch=int(input_shape[0])))
    return out


# --------------------------------------------------------------------------- export
def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).to("cpu").eval()


def export_torchscript(model: nn.Module, example: Tensor, path: str | Path) -> Path:
    """``torch.jit.trace`` of the model in eval mode on CPU (the derived nets have no data-dependent
    control flow, so tracing is exact), saved to ``path``."""
    path = Path(path)
    m = _cpu_eval_copy(model)
    with torch.no_grad():
        traced = torch.jit.trace(m, example.cpu(), check_trace=True)
    traced.save(str(path))
    return path


def export_onnx(model: nn.Module, example: Tensor, path: str | Path, opset: int = 17) -> dict:
    """ONNX export, offline: the TorchScript-based exporter (``dynamo=False``) first, the dynamo
    exporter if that fails; the file is checked with ``onnx.checker``. Returns {path, exporter, opset}.
    The batch dimension is dynamic."""
    import onnx

    path = Path(path)
    m = _cpu_eval_copy(model)
    errors = []
    for dynamo in (False, True):
        try:
            kwargs: dict[str, Any] = dict(input_names=["input"], output_names=["logits"], opset_version=opset,
                                          dynamo=dynamo)
            if dynamo:
                kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
            else:
                kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
            with torch.no_grad():
                torch.onnx.export(m, (example.cpu(),), str(path), **kwargs)
            onnx.checker.check_model(onnx.load(str(path)), full_check=True)
            return {"path": str(path), "exporter": "dynamo" if dynamo else "torchscript", "opset": opset}
        except Exception as e:  # try the other exporter, then report both failures
            errors.append(f"dynamo={dynamo}: {type(e).__name__}: {e}")
    raise RuntimeError("ONNX export failed with both exporters:\n" + "\n".join(errors))


def check_exports(model: nn.Module, example: Tensor, torchscript_path: str | Path | None = None,
                  onnx_path: str | Path | None = None) -> dict:
    """Load each exported file, run it on ``example`` and return max |output - PyTorch output| per
    format (``onnx_runtime`` names what ran the ONNX graph: onnxruntime when installed, else
    ``onnx.reference.ReferenceEvaluator``)."""
    m = _cpu_eval_copy(model)
    x = example.cpu()
    with torch.no_grad():
        ref = m(x)
    out: dict[str, Any] = {}
    if torchscript_path is not None:
        loaded = torch.jit.load(str(torchscript_path), map_location="cpu")
        with torch.no_grad():
            out["torchscript_max_abs_diff"] = float((loaded(x) - ref).abs().max())
    if onnx_path is not None:
        feed = {"input": x.numpy()}
        try:
            import onnxruntime as ort  # optional: faster, and the runtime users deploy with

            sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            got = sess.run(None, feed)[0]
            out["onnx_runtime"] = "onnxruntime"
        except ImportError:
            import onnx
            from onnx.reference import ReferenceEvaluator

            got = ReferenceEvaluator(onnx.load(str(onnx_path))).run(None, feed)[0]
            out["onnx_runtime"] = "onnx.reference"
        out["onnx_max_abs_diff"] = float((torch.from_numpy(got) - ref).abs().max())
    return out


# --------------------------------------------------------------------------- state
def retrain_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler | None, epoch: int, step: int,
                       history: list[dict], extra: Mapping[str, Any] | None = None) -> dict:
    return {"format": RETRAIN_STATE_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None, "epoch": int(epoch),
            "step": int(step), "history": list(history), "rng": torch.get_rng_state(), **dict(extra or {})}


def load_retrain_state(state: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                       scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> dict:
    """Restore what ``retrain_state_dict`` saved; returns {epoch, step, history}."""
    if state.get("format") != RETRAIN_STATE_FORMAT:
        raise ValueError(f"not a retrain state (format={state.get('format')!r}); pass what retrain_state_dict "
                         "returned")
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if state.get("rng") is not None:
        torch.set_rng_state(state["rng"])
    return {"epoch": int(state["epoch"]), "step": int(state["step"]), "history": list(state["history"])}


def state_to_bytes(state: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


def state_from_bytes(data: bytes, map_location: str | torch.device = "cpu") -> dict:
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)

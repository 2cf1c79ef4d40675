"""The DenseNAS search loop: warm-up, alternating architecture / weight passes, checkpointable state.

Schedule (all counts and rates from ``SearchConfig``; defaults are the paper's ImageNet search):

- epochs ``0 .. warmup_epochs-1``: weights only, one op per mixed op sampled *uniformly*;
- later epochs: an architecture pass over the search-val split, then a weight pass over the
  search-train split, weight-step ops sampled from softmax(alpha).

Weight step: one op per mixed op, every block edge active and weighted by p (no autograd through
alpha/beta), cross-entropy, SGD (momentum 0.9, weight decay 4e-5, cosine per step lr -> lr_min).
Gradients are set to None before each step, so SGD (its momentum and its weight decay) updates
only the ops that ran in this step and the always-on layers (stem, first layer, final convs,
classifier): an op that was not sampled is left exactly as it was. This is deliberate (the
paper's one-path sampling: an unsampled op receives no signal, so it should not decay or drift on
stale momentum); it differs from the authors' PyTorch 1.0 code, where every weight decayed every step.

Architecture step: two ops per mixed op sampled from softmax(alpha), their outputs mixed by softmax
over the pair; loss ``CE + lambda * ln(E[latency]) / ln(tau)`` (eq. 8), where E[latency] mixes each
layer's cost with the same pair softmax as its features (the authors' released ``MixedOp``; with the
softmax over all ops instead, a pair on one side of the layer's mean moves together and the eq. 9
re-balance cancels the move, so the cheaper op of the pair would not gain); Adam (lr 3e-4, betas
(0.5, 0.999), weight decay 1e-3) on alpha and beta; then the re-balancing of eq. 9, done exactly:
entries that were not sampled are restored to their pre-step values (Adam's weight decay and
momentum move them otherwise) and the sampled pair is shifted by ``log(sum_old / sum_new)`` of its
exponentials, so softmax(alpha) of every unsampled op is unchanged. Only architecture gradients
are computed in this step (``torch.autograd.grad`` w.r.t. alpha and beta: no weight-gradient kernels run).

Distribution hooks (Ray Train reuses this class unchanged): ``grad_sync(list_of_grads)`` is called
after every backward, on the weight gradients of a weight step and on the architecture gradients
of an architecture step (e.g. an all-reduce mean); the sampling generator is re-seeded at every
step from ``(seed, epoch, step, stream)``, so every rank samples the same ops without communication.

``SearchState`` (``Searcher.state_dict()``): weights, alpha, beta, both optimizers, the scheduler,
RNG states (torch, numpy, python, sampling generator), epoch, step, history; ``torch.save``-able.
Data order is a function of ``(seed, epoch)`` (``epoch_permutation``), so a resumed search is
the same search.

CLI (``densenas.search_cli``): ``python -m densenas.search --config configs/search_tiny.yaml --out OUT``.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from densenas.derive import Derivation, argmax_ops, derive, viterbi_path
from densenas.latency import CostModel, ExpectedLatency, MacsCostModel, load_cost_model

__all__ = [
    "WeightOptimConfig",
    "ArchOptimConfig",
    "SearchConfig",
    "SearchState",
    "Searcher",
    "CollapseWarning",
    "seed_from",
    "epoch_permutation",
    "iterate_batches",
    "latency_loss",
    "entropy",
]

STATE_FORMAT = "densenas-search-state"
STATE_VERSION = 1
GradSync = Callable[[list[Tensor]], None]


# --------------------------------------------------------------------------- configuration
class WeightOptimConfig(BaseModel):
    """SGD on the super network's weights, cosine per step from ``lr`` to ``lr_min``."""

    model_config = ConfigDict(extra="forbid")
    lr: float = Field(0.2, gt=0)
    lr_min: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(4e-5, ge=0)
    nesterov: bool = False
    grad_clip: float | None = Field(None, gt=0, description="max global grad norm; None: no clipping")

    @model_validator(mode="after")
    def _lr_order(self) -> "WeightOptimConfig":
        if self.lr_min > self.lr:
            raise ValueError(f"weights.lr_min ({self.lr_min}) must not exceed weights.lr ({self.lr})")
        return self


class ArchOptimConfig(BaseModel):
    """Adam on alpha and beta."""

    model_config = ConfigDict(extra="forbid")
    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = Field(1e-3, ge=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"arch.betas must be two numbers in [0, 1), got {v}")
        return v


class SearchConfig(BaseModel):
    """The ``search`` section: schedule, optimizers, objective, cost model. Defaults: the paper.

    YAML spells lambda as ``lambda`` (a Python keyword, hence the field name ``lambda_``).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    epochs: int = Field(250, ge=1, description="total epochs, warm-up included (paper: 250)")
    warmup_epochs: int = Field(150, ge=0, description="weights-only epochs first (paper: 150)")
    batch_size: int = Field(352, ge=1)
    weights: WeightOptimConfig = WeightOptimConfig()
    arch: ArchOptimConfig = ArchOptimConfig()
    lambda_: float = Field(0.15, alias="lambda", ge=0, description="latency weight of eq. 8")
    tau: float = Field(15.0, gt=1, description="base of the latency log in eq. 8; must be > 1")
    cost: str = Field("macs", description="'macs', a latency-table JSON path, or (pipeline) 'profile' or a "
                                          "table's store URI (s3://.../table.json)")
    macs_skip_fraction: float = Field(0.1, ge=0, le=1, description="MACs model: a skip's cost vs the cheapest op")
    seed: int = 0
    derive_budget: float | None = Field(None, gt=0, description="derive the best path within this cost")
    arch_batch_size: int | None = Field(None, ge=1, description="architecture-step batch (None: batch_size)")
    arch_steps_per_epoch: int | None = Field(
        None, ge=1, description="architecture steps per search epoch (None: one pass over search-val); more "
                                "than one pass cycles the epoch's search-val batches in a reshuffled order")
    target_latency: float | None = Field(
        None, gt=0, description="cost-model units: lambda follows dual ascent so that the derived net's "
                                "predicted cost approaches this; lambda is then only its starting value")
    dual_lr: float = Field(0.05, ge=0, description="target mode: lambda += dual_lr * (cost / target - 1) "
                                                   "after every architecture step")
    target_tolerance: float = Field(0.05, gt=0, lt=1, description="target mode: the derived net is the most "
                                    "probable one within target * (1 +- target_tolerance) (densenas.derive.near_target)")
    target_kind: Literal["equal", "at_most"] = Field(
        "equal", description="target mode: 'equal' lets lambda go below 0 (the search then spends latency up to "
                             "the target); 'at_most' clips lambda at 0 (a budget: cheaper is fine)")

    @model_validator(mode="after")
    def _warmup(self) -> "SearchConfig":
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")
        return self

    def dump(self) -> dict:
        """The YAML/JSON form (``lambda`` spelled as in YAML)."""
        return self.model_dump(by_alias=True, mode="json")


def latency_loss(latency: Tensor, lam: float, tau: float) -> Tensor:
    """``lambda * ln(latency) / ln(tau)`` (eq. 8's latency term)."""
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    if tau <= 1:
        raise ValueError(f"tau must be > 1, got {tau}")
    return lam * torch.log(latency) / math.log(tau)


def entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of softmax(logits)."""
    logp = F.log_softmax(logits.detach().double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------- determinism helpers
def seed_from(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and machines)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def epoch_permutation(n: int, seed: int, epoch: int, stream: str = "train") -> Tensor:
    """The order of ``n`` samples in an epoch: a function of (seed, epoch, stream) only."""
    g = torch.Generator().manual_seed(seed_from(seed, epoch, "data", stream))
    return torch.randperm(n, generator=g)


def iterate_batches(images: Tensor, labels: Tensor, batch_size: int, seed: int, epoch: int,
                    stream: str = "train", drop_last: bool = True,
                    transform: Callable[[Tensor], Tensor] | None = None) -> Iterable[tuple[Tensor, Tensor]]:
    """In-memory batches in the epoch's deterministic order (the CLI and tests use this)."""
    order = epoch_permutation(len(labels), seed, epoch, stream)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        x = images[idx]
        yield (transform(x) if transform else x), labels[idx]


# --------------------------------------------------------------------------- state
class SearchState(TypedDict):
    """Everything needed to continue a search exactly; ``torch.save(state, f)`` stores it."""

    format: str
    version: int
    config: dict
    space_hash: str
    num_classes: int
    supernet: dict
    weight_optimizer: dict
    arch_optimizer: dict
    weight_scheduler: dict
    rng: dict
    epoch: int
    step: int
    arch_step: int
    steps_per_epoch: int
    history: list
    lam: float


class CollapseWarning(UserWarning):
    """The derived architecture degenerated (all stacking layers skipped, or every op the cheapest)."""


class _Cosine:
    """Per-step cosine factor for LambdaLR: lr_min/lr at the end (a picklable object, not a lambda)."""

    def __init__(self, total_steps: int, min_ratio: float):
        self.total_steps, self.min_ratio = max(1, int(total_steps)), float(min_ratio)

    def __call__(self, step: int) -> float:
        t = min(step, self.total_steps) / self.total_steps
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class _Meter:
    def __init__(self) -> None:
        self.loss = self.correct = self.count = 0.0

    def add(self, loss: float, correct: float, n: int) -> None:
        self.loss += loss * n
        self.correct += correct
        self.count += n

    def result(self) -> tuple[float | None, float | None]:
        if not self.count:
            return None, None
        return self.loss / self.count, self.correct / self.count


# --------------------------------------------------------------------------- the searcher
class Searcher:
    """Runs DenseNAS search steps on one ``SuperNet`` (one process, or one rank of a data-parallel job).

    ``steps_per_epoch`` (weight steps per epoch) fixes the cosine schedule's length. ``grad_sync``
    averages gradients across ranks (called after each backward with the list of gradients that
    the optimizer will use); ``None`` on a single process. ``channels_last`` runs the network in
    NHWC (same results up to float rounding); a ``SuperNet`` built with ``channels_last=True`` (its
    default) is NHWC already and the searcher then feeds it NHWC batches too. Interleaved A/B on the
    ImageNet space, 2 threads: NHWC 1.2-1.7x faster than NCHW in all four step/input cases
    (docs/benchmarks/search.md).
    """

    def __init__(self, supernet: nn.Module, config: SearchConfig, cost_model: CostModel | None = None,
                 steps_per_epoch: int = 1, device: str | torch.device | None = None,
                 grad_sync: GradSync | None = None, log: Callable[[str], None] | None = print,
                 channels_last: bool = False):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.net, self.config = supernet, config
        self.device = torch.device(device) if device is not None else next(supernet.parameters()).device
        self.net.to(self.device)
        # NHWC: oneDNN's depthwise convs (and their backward) are several times faster; the whole step
        # measured 1.2-1.7x faster than NCHW (interleaved A/B, both steps, 224 b8 and 64 b32). Batches
        # follow the network's format so that forward does not convert every batch again.
        channels_last = channels_last or bool(getattr(supernet, "channels_last", False))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.space = supernet.space
        if cost_model is None:
            cost_model = load_cost_model(config.cost, self.space, skip_fraction=config.macs_skip_fraction)
        self.cost_model = cost_model
        self.latency = ExpectedLatency(supernet, cost_model).to(self.device)
        self.grad_sync, self.log = grad_sync, log
        self.steps_per_epoch = int(steps_per_epoch)

        w, a = config.weights, config.arch
        self.weight_params = list(supernet.weight_parameters())
        self.arch_params = list(supernet.arch_parameters())
        self.alphas = [m.alpha for m in supernet.mixed_ops]
        self.betas = list(supernet.betas)
        self.weight_optimizer = torch.optim.SGD(self.weight_params, lr=w.lr, momentum=w.momentum,
                                                weight_decay=w.weight_decay, nesterov=w.nesterov)
        self.arch_optimizer = torch.optim.Adam(self.arch_params, lr=a.lr, betas=a.betas,
                                               weight_decay=a.weight_decay)
        self.weight_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.weight_optimizer, _Cosine(config.epochs * self.steps_per_epoch, w.lr_min / w.lr))
        self.generator = torch.Generator()
        self.epoch = 0          # epochs completed
        self.step = 0           # weight steps completed (all epochs)
        self.arch_step_count = 0
        self.lam = float(config.lambda_)  # eq. 8's lambda; moves by dual ascent when target_latency is set
        self._epoch_step = 0    # steps (weight + arch) taken in the current epoch: the sampling seed
        self.history: list[dict] = []
        self._net_modules = tuple(supernet.modules())

    # ----------------------------------------------------------------- helpers
    @property
    def in_warmup(self) -> bool:
        return self.epoch < self.config.warmup_epochs

    def _reseed(self, stream: str) -> torch.Generator:
        self.generator.manual_seed(seed_from(self.config.seed, self.epoch, self._epoch_step, stream))
        self._epoch_step += 1
        return self.generator

    def _train_mode(self) -> None:
        """``net.train()``, skipped when every module already trains. The super network has thousands of
        modules and ``Module.train`` sets each one's flag through ``Module.__setattr__``: 19 ms per call
        (the ImageNet space, measured), once per step. Reading the flags takes under 1 ms."""
        if not all(m.training for m in self._net_modules):
            self.net.train()

    def _to_device(self, batch: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch[0], batch[1]
        x = x.to(self.device, non_blocking=True)
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return x, y.to(self.device, non_blocking=True)

    def expected_latency(self) -> Tensor:
        return self.latency(self.alphas, self.betas)

    # ----------------------------------------------------------------- steps
    def weight_step(self, batch: Sequence[Tensor]) -> dict:
        """One super-network weight update on ``batch`` = (images, labels); returns loss/accuracy."""
        x, y = self._to_device(batch)
        mode = "uniform1" if self.in_warmup else "alpha1"
        choices = self.net.sample_choices(mode, self._reseed("weight"))
        self._train_mode()
        self.weight_optimizer.zero_grad(set_to_none=True)
        logits = self.net(x, choices, arch_grad=False)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        grads = [p.grad for p in self.weight_params if p.grad is not None]
        if self.grad_sync is not None:
            self.grad_sync(grads)
        if self.config.weights.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.weight_params if p.grad is not None],
                                           self.config.weights.grad_clip)
        self.weight_optimizer.step()
        self.weight_scheduler.step()
        self.step += 1
        with torch.no_grad():
            correct = float((logits.argmax(1) == y).sum())
        return {"loss": float(loss.detach()), "correct": correct, "n": int(y.numel())}

    def arch_step(self, batch: Sequence[Tensor], choices: Sequence[Sequence[int]] | None = None) -> dict:
        """One architecture update (two ops per mixed op, eq. 8 loss, Adam, exact eq. 9 re-balance).

        The latency term mixes each layer's cost with the softmax over its sampled pair, as the
        features are mixed (``ExpectedLatency(..., choices)``). ``choices``: the ops to run (default:
        two sampled from softmax(alpha)); the sampling stream advances either way.
        """
        x, y = self._to_device(batch)
        sampled = self.net.sample_choices("alpha2", self._reseed("arch"))
        choices = sampled if choices is None else choices
        self._train_mode()
        # Weights frozen for the forward (as the authors' set_param_grad_state('Arch')): autograd.grad
        # w.r.t. alpha and beta alone already skips the weight-gradient kernels, but with weights that
        # require grad the forward still records the stem and the layers before the first alpha and
        # saves their activations (0.33 GiB at 224x224 batch 8, measured); frozen, it records neither.
        frozen = [p for p in self.weight_params if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            logits = self.net(x, choices, arch_grad=True)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        ce = F.cross_entropy(logits, y)
        lat = self.latency(self.alphas, self.betas, choices)
        # In target mode ('equal') lambda is a free multiplier and may be negative; otherwise it is >= 0.
        loss = ce + (latency_loss(lat, self.lam, self.config.tau) if self.lam >= 0
                     else self.lam * torch.log(lat) / math.log(self.config.tau))
        # Gradients w.r.t. alpha and beta only (the weights were not recorded).
        grads = torch.autograd.grad(loss, self.arch_params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.arch_params, grads)]
        if self.grad_sync is not None:
            self.grad_sync(grads)
        for p, g in zip(self.arch_params, grads):
            p.grad = g
        old = [a.detach().clone() for a in self.alphas]
        self.arch_optimizer.step()
        self.arch_optimizer.zero_grad(set_to_none=True)
        self._rebalance(old, choices)
        self.arch_step_count += 1
        if self.config.target_latency is not None:
            self.dual_step()
        with torch.no_grad():
            correct = float((logits.argmax(1) == y).sum())
        return {"loss": float(ce.detach()), "correct": correct, "n": int(y.numel()),
                "latency": float(lat.detach())}

    @torch.no_grad()
    def derived_cost(self) -> float:
        """Predicted cost of the network ``derive()`` would return now (Viterbi path, argmax ops)."""
        probs = {e: float(p) for e, p in self.net.edge_probs().items()}
        return self.latency.path_cost(viterbi_path(self.space, probs), argmax_ops(self.net))

    def dual_step(self) -> float:
        """Target mode: one dual-ascent step on lambda, the multiplier of the constraint on the derived
        net's cost: ``lambda <- lambda + dual_lr * (cost / target - 1)``, clipped at 0 when
        ``target_kind`` is 'at_most' (cost <= target), free in sign when 'equal' (cost = target).
        The derived net's cost (not the expected cost of the distribution) is what the target is about."""
        gap = self.derived_cost() / float(self.config.target_latency) - 1.0
        self.lam = self.lam + self.config.dual_lr * gap
        if self.config.target_kind == "at_most":
            self.lam = max(0.0, self.lam)
        return self.lam

    @torch.no_grad()
    def _rebalance(self, old: Sequence[Tensor], choices: Sequence[Sequence[int]]) -> None:
        """Eq. 9, exact: unsampled alphas back to their old values; the sampled ops shifted so that
        the sum of their exponentials is what it was (so every unsampled op keeps its probability)."""
        for alpha, before, chosen in zip(self.alphas, old, choices):
            idx = torch.as_tensor(chosen, device=alpha.device)
            new_pair = alpha[idx]
            shift = torch.logsumexp(before[idx].double(), 0) - torch.logsumexp(new_pair.double(), 0)
            alpha.copy_(before)
            alpha[idx] = (new_pair.double() + shift).to(alpha.dtype)

    @torch.no_grad()
    def eval_step(self, batch: Sequence[Tensor]) -> dict:
        """Loss/accuracy of the super network with ops sampled as in the current weight step (no update)."""
        x, y = self._to_device(batch)
        choices = self.net.sample_choices("uniform1" if self.in_warmup else "alpha1", self._reseed("eval"))
        self._train_mode()  # the super network's BN has no running statistics worth using
        logits = self.net(x, choices, arch_grad=False)
        return {"loss": float(F.cross_entropy(logits, y)), "correct": float((logits.argmax(1) == y).sum()),
                "n": int(y.numel())}

    # ----------------------------------------------------------------- epochs
    def run_epoch(self, train_iter: Iterable[Sequence[Tensor]], val_iter: Iterable[Sequence[Tensor]] | None = None,
                  max_steps: int | None = None) -> dict:
        """One epoch: (after warm-up) an architecture pass over ``val_iter``, then a weight pass over
        ``train_iter``; during warm-up ``val_iter`` is only evaluated. Returns the epoch's record."""
        t0 = time.perf_counter()
        self._epoch_step = 0
        warm = self.in_warmup
        val, train = _Meter(), _Meter()
        lat_sum, lat_n = 0.0, 0
        if val_iter is not None:
            batches = val_iter if warm else self._arch_batches(val_iter)
            for n, batch in enumerate(batches):
                if max_steps is not None and n >= max_steps:
                    break
                r = self.eval_step(batch) if warm else self.arch_step(batch)
                val.add(r["loss"], r["correct"], r["n"])
                if "latency" in r:
                    lat_sum, lat_n = lat_sum + r["latency"], lat_n + 1
        t_arch = time.perf_counter() - t0
        for n, batch in enumerate(train_iter):
            if max_steps is not None and n >= max_steps:
                break
            r = self.weight_step(batch)
            train.add(r["loss"], r["correct"], r["n"])
        self.epoch += 1
        record = self.epoch_record(train, val, time.perf_counter() - t0, t_arch, warm)
        self.history.append(record)
        if self.log is not None:
            self.log(_format_record(record, self.config.epochs))
        return record

    def _arch_batches(self, val_iter: Iterable[Sequence[Tensor]]) -> Iterator[Sequence[Tensor]]:
        """The architecture pass: ``arch_steps_per_epoch`` batches (None: one pass over ``val_iter``).
        Past the first pass, the epoch's batches are held and replayed in an order drawn from
        (seed, epoch, pass), so every rank replays the same way."""
        want = self.config.arch_steps_per_epoch
        if want is None:
            yield from val_iter
            return
        held: list[Sequence[Tensor]] = []
        it = iter(val_iter)
        for batch in it:
            if len(held) < want:
                held.append(batch)
                yield batch
            # else: drained, so a streaming split is read to its end
        if not held:
            return
        given, rounds = len(held), 0
        while given < want:
            rounds += 1
            g = torch.Generator().manual_seed(seed_from(self.config.seed, self.epoch, rounds, "arch-pass"))
            for i in torch.randperm(len(held), generator=g).tolist():
                if given >= want:
                    break
                yield held[i]
                given += 1

    def derive(self, budget: float | None = None) -> Derivation:
        budget = self.config.derive_budget if budget is None else budget
        return derive(self.net, self.cost_model, budget=budget, build_arch=_arch_available(),
                      target=self.config.target_latency if budget is None else None,
                      tolerance=self.config.target_tolerance)

    def epoch_record(self, train: _Meter, val: _Meter, seconds: float, arch_seconds: float, warm: bool) -> dict:
        with torch.no_grad():
            lat = float(self.expected_latency())
            a_ent = float(torch.stack([entropy(a) for a in self.alphas]).mean()) if self.alphas else 0.0
            b_ent = float(torch.stack([entropy(b) for b in self.betas if b.numel() > 1]).mean())
        d = self.derive()
        # Warm-up alphas are uniform (argmax = the first op): collapse is only meaningful after it.
        warns = [] if warm else collapse_warnings(self.net, d, self.latency)
        for w in warns:
            warnings.warn(w, CollapseWarning, stacklevel=2)
        train_loss, train_acc = train.result()
        val_loss, val_acc = val.result()
        rec = {
            "epoch": self.epoch, "phase": "warmup" if warm else "search", "step": self.step,
            "lr": self.weight_optimizer.param_groups[0]["lr"],
            "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
            "expected_latency": lat, "latency_units": self.latency.units,
            "derived": d.to_dict(), "predicted_latency": d.predicted_cost,
            "alpha_entropy": a_ent, "beta_entropy": b_ent, "derived_path_prob": d.path_prob,
            "lambda": self.lam, "arch_steps": self.arch_step_count,
            "seconds": seconds, "arch_seconds": arch_seconds, "warnings": warns,
        }
        rec.update(_counts(self.net, d))
        return rec

    # ----------------------------------------------------------------- state
    def state_dict(self) -> SearchState:
        return SearchState(
            format=STATE_FORMAT, version=STATE_VERSION, config=self.config.dump(),
            space_hash=self.space.space_hash(), num_classes=int(self.net.num_classes),
            supernet=self.net.state_dict(), weight_optimizer=self.weight_optimizer.state_dict(),
            arch_optimizer=self.arch_optimizer.state_dict(), weight_scheduler=self.weight_scheduler.state_dict(),
            rng={"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                 "sampling": self.generator.get_state(),
                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            epoch=self.epoch, step=self.step, arch_step=self.arch_step_count,
            steps_per_epoch=self.steps_per_epoch, history=list(self.history), lam=self.lam)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a search state (format={state.get('format')!r}); "
                             "pass what Searcher.state_dict() returned")
        if state["space_hash"] != self.space.space_hash():
            raise ValueError(f"search state belongs to space {state['space_hash'][:12]}, this super network's "
                             f"space is {self.space.space_hash()[:12]}; resume with the same space")
        if int(state["num_classes"]) != int(self.net.num_classes):
            raise ValueError(f"search state has {state['num_classes']} classes, the super network "
                             f"{self.net.num_classes}")
        if int(state["steps_per_epoch"]) != self.steps_per_epoch:
            raise ValueError(f"search state was made with steps_per_epoch={state['steps_per_epoch']}, this "
                             f"searcher has {self.steps_per_epoch}; the cosine schedule depends on it")
        self.net.load_state_dict(state["supernet"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.arch_optimizer.load_state_dict(state["arch_optimizer"])
        self.weight_scheduler.load_state_dict(state["weight_scheduler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.generator.set_state(rng["sampling"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.arch_step_count = int(state["arch_step"])
        # lambda is the config's: a state from a shared warm-up (or another trial's lambda) must not
        # carry its lambda into this search. Only the target mode's dual ascent makes it state, once it
        # has taken architecture steps.
        adapted = self.config.target_latency is not None and self.arch_step_count > 0
        self.lam = float(state.get("lam", self.config.lambda_)) if adapted else float(self.config.lambda_)
        self.history = list(state["history"])

    def save(self, path: str | Path) -> None:
        """Atomic ``torch.save`` of the state (write aside, then rename)."""
        path = Path(path)
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)

    def load(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))


# --------------------------------------------------------------------------- records
def _arch_available() -> bool:
    try:
        from densenas.arch import arch_from_derivation  # noqa: F401
    except ImportError:
        return False
    return True


def _counts(net: nn.Module, d: Derivation) -> dict:
    """Parameters and MACs of the derived network (batch 1, the network's classes)."""
    model = ExpectedLatency(net, MacsCostModel(net.space, skip_fraction=0.0))
    out: dict[str, Any] = {"macs": round(model.path_cost(d.path, d.op_choice) * 1e6), "params": None}
    if d.arch is not None:
        try:
            from densenas.arch import build_model
            from densenas.counting import count_params

            with torch.device("meta"):
                m = build_model(d.arch, num_classes=net.num_classes)
            out["params"] = int(count_params(m))
        except Exception as e:  # counting is a report, never a reason to stop a search
            out["params_error"] = f"{type(e).__name__}: {e}"
    return out


def collapse_warnings(net: nn.Module, d: Derivation, latency: ExpectedLatency) -> list[str]:
    """Messages when the derived network degenerated: every stacking layer a skip, or every op the
    cheapest of its candidates under the cost model."""
    out = []
    on_path = set(d.path)
    path_edges = set(zip(d.path, d.path[1:]))
    stack_ops = [(k, m) for k, m in enumerate(net.mixed_ops) if m.kind == "stack" and m.block in on_path]
    if stack_ops and all(m.op_names[d.op_choice[k]] == "skip" for k, m in stack_ops):
        out.append(f"search collapsed: every stacking layer on the derived path {d.path} is a skip; "
                   "lower lambda or raise tau")
    chosen = [(k, m) for k, m in enumerate(net.mixed_ops)
              if (m.kind == "head" and tuple(m.edge) in path_edges) or (m.kind == "stack" and m.block in on_path)]
    if chosen:
        cheapest = True
        heads = {int(latency.head_index[n]): n for n in range(len(latency.head_index))}
        stacks = {int(latency.stack_index[n]): n for n in range(len(latency.stack_index))}
        for k, m in chosen:
            costs = latency.head_costs[heads[k]] if k in heads else latency.stack_costs[stacks[k]]
            if len(costs) > 1 and float(costs[d.op_choice[k]]) > float(costs.min()) + 1e-12:
                cheapest = False
                break
        if cheapest and any(len(m.op_names) > 1 for _, m in chosen):
            out.append("search collapsed: every derived op is the cheapest candidate of its layer; "
                       "lower lambda or raise tau")
    return out


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _format_record(r: dict, total: int) -> str:
    return (f"epoch {r['epoch']}/{total} [{r['phase']}] lr {r['lr']:.4g} "
            f"train loss {_fmt(r['train_loss'])} acc {_fmt(r['train_acc'])} | "
            f"val loss {_fmt(r['val_loss'])} acc {_fmt(r['val_acc'])} | "
            f"E[lat] {r['expected_latency']:.4g} {r['latency_units']} | derived {r['predicted_latency']:.4g} "
            f"path {r['derived']['path']} p {r['derived_path_prob']:.3g} | H(alpha) {r['alpha_entropy']:.3f} "
            f"H(beta) {r['beta_entropy']:.3f} | lambda {r['lambda']:.4g} | {r['arch_steps']} arch steps "
            f"| {r['seconds']:.1f}s" + ("".join(f"\n  WARNING: {w}" for w in r["warnings"])))


if __name__ == "__main__":   # python -m densenas.search: the single-process CLI
    from densenas.search_cli import main

    sys.exit(main())

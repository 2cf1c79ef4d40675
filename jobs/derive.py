"""The derive stage: architecture parameters of a finished search -> the derived network, as data and pictures.

    run(DeriveConfig(k_best=5), DeriveInputs(space, search_outputs, cost_model, num_classes), ctx) -> DeriveOutput

What it reads (``inputs.search_outputs``): anything that holds alpha and beta --

- a ``densenas.search.SearchState`` (``Searcher.state_dict()``; a dict, a ``.pt`` path or its bytes),
- a ``SuperNet`` state dict (``SuperNet.state_dict()``) or a ``SuperNet`` itself,
- an architecture-parameter document ``{"format": "densenas-arch-params", "alphas": [[...], ...],
  "betas": [[...], ...], "num_classes": N}`` (``arch_params_doc``; JSON, ``mixed_ops`` / block order).

Only alpha and beta are used: the super network is rebuilt on the meta device (no weights allocated),
so deriving from an ImageNet-space search costs seconds, not gigabytes.

What it writes (in ``ctx.store``, keys relative to it): ``arch.json`` (the versioned architecture
document), ``arch.official.txt`` (the authors' string), ``arch_one_line.txt``, ``arch_params.json``
(the alpha/beta it derived from), ``k_best.json`` (the k most probable block paths with their
probability and predicted cost), ``derivation.json``, and with ``diagram: true`` the pictures
``path_diagram.png``, ``alpha_heatmap.png``, ``beta_heatmap.png``. ``DeriveOutput``:
``arch`` (document), ``arch_key``, ``one_line``, ``official``, ``path``, ``predicted_latency``, ``latency_units``,
``params``, ``macs`` and the same numbers under ``metrics``.

With ``latency_budget`` the path is the most probable one whose predicted cost stays within the
budget (``densenas.derive.best_path_within``; the ops stay argmax); a budget no path fits is an error
that names the cheapest reachable cost.
"""
from __future__ import annotations

import io
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from densenas.arch import build_model
from densenas.counting import count_macs, count_params
from densenas.derive import derive, k_best_paths
from densenas.latency import ExpectedLatency
from densenas.space import SearchSpace
from densenas.supernet import SuperNet
from jobs.context import StageContext, StageOutput, resolve_space

__all__ = ["DeriveConfig", "DeriveInputs", "DeriveOutput", "DeriveError", "run",
           "supernet_from_search_outputs", "arch_params_doc", "ARCH_PARAMS_FORMAT"]

ARCH_PARAMS_FORMAT = "densenas-arch-params"


class DeriveError(ValueError):
    """The derive stage cannot find or read what it needs; the message says what to provide."""


class DeriveConfig(BaseModel):
    """The ``derive`` section."""

    model_config = ConfigDict(extra="forbid")
    k_best: int = Field(5, ge=1, le=100, description="how many most-probable block paths to list in k_best.json")
    latency_budget: float | None = Field(None, gt=0, description="derive the most probable path whose predicted "
                                                                 "cost (cost model units) is within this budget")
    diagram: bool = Field(True, description="draw path_diagram.png, alpha_heatmap.png, beta_heatmap.png")
    count_macs: bool = Field(True, description="count params and MACs of the derived network (meta device)")


# --------------------------------------------------------------------------- reading alpha / beta
def arch_params_doc(supernet: SuperNet) -> dict:
    """The architecture parameters of a super network as a JSON-able document (what derive reads back)."""
    return {"format": ARCH_PARAMS_FORMAT, "version": 1, "space_hash": supernet.space.space_hash(),
            "num_classes": int(supernet.num_classes),
            "mixed_ops": [{"kind": m.kind, "block": int(m.block),
                           "edge": list(m.edge) if m.kind == "head" else None, "op_names": list(m.op_names)}
                          for m in supernet.mixed_ops],
            "alphas": [m.alpha.detach().float().cpu().tolist() for m in supernet.mixed_ops],
            "betas": [b.detach().float().cpu().tolist() for b in supernet.betas]}


def _load_blob(source: Any) -> Any:
    """bytes / path / JSON text -> a Python object (torch.load for .pt, json for .json)."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        if data.lstrip()[:1] == b"{":
            return json.loads(data)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    if isinstance(source, (str, Path)):
        text = str(source)
        if text.lstrip().startswith("{"):
            return json.loads(text)
        p = Path(source)
        if not p.exists():
            raise DeriveError(f"search output {text!r} does not exist; pass a search state (.pt), a SuperNet "
                              "state dict, or an arch_params.json")
        if p.suffix == ".json":
            return json.loads(p.read_text())
        return torch.load(p, map_location="cpu", weights_only=False)
    return source


def supernet_from_search_outputs(space: SearchSpace, search_outputs: Any, num_classes: int | None = None
                                 ) -> SuperNet:
    """A ``SuperNet`` of ``space`` on the meta device with the real alphas / betas of ``search_outputs``."""
    if isinstance(search_outputs, SuperNet):
        return search_outputs
    obj = _load_blob(search_outputs)
    if not isinstance(obj, Mapping):
        raise DeriveError(f"search output is a {type(obj).__name__}; expected a search state, a SuperNet state "
                          "dict or an arch_params document")
    # A search in target-latency mode derives within its target band (densenas.derive.near_target).
    target = {k: (obj.get("config") or {}).get(k, obj.get(k)) for k in ("target_latency", "target_tolerance")}
    if obj.get("format") == "densenas-search-state":
        if obj.get("space_hash") not in (None, space.space_hash()):
            raise DeriveError(f"the search state belongs to space {str(obj['space_hash'])[:12]}, not "
                              f"{space.space_hash()[:12]} ({space.name}); derive with the space it searched")
        num_classes = num_classes or int(obj["num_classes"])
        obj = obj["supernet"]
    if obj.get("format") == ARCH_PARAMS_FORMAT or ("alphas" in obj and "betas" in obj):
        if obj.get("space_hash") not in (None, space.space_hash()):
            raise DeriveError(f"arch params belong to space {str(obj['space_hash'])[:12]}, not "
                              f"{space.space_hash()[:12]} ({space.name})")
        # jobs.search writes each alpha as {"kind", "block", "edge", "op_names", "alpha"}; ours as a list.
        alphas = [torch.tensor(a["alpha"] if isinstance(a, Mapping) else a, dtype=torch.float32)
                  for a in obj["alphas"]]
        betas = [torch.tensor(b, dtype=torch.float32) for b in obj["betas"]]
        num_classes = num_classes or int(obj.get("num_classes") or 0) or None
    else:  # a SuperNet state dict: keys of its arch parameters
        alphas, betas = None, None
    if num_classes is None:
        raise DeriveError("the number of classes is unknown: the search output does not record it; pass num_classes")
    with torch.device("meta"):
        net = SuperNet(space, num_classes=int(num_classes))
    net.latency_target = target
    if alphas is None:
        names = [n for n, _ in net.named_arch_parameters()]
        missing = [n for n in names if n not in obj]
        if missing:
            raise DeriveError(f"the search output has no architecture parameters {missing[:4]} (of {len(names)}); "
                              "it is not a state of this space's SuperNet")
        alpha_names = [n for n in names if not n.startswith("betas.")]
        alphas = [obj[n] for n in alpha_names]
        betas = [obj[f"betas.{i}"] for i in range(len(net.betas))]
    if len(alphas) != len(net.mixed_ops) or len(betas) != len(net.betas):
        raise DeriveError(f"search output has {len(alphas)} alphas / {len(betas)} betas, the space's super network "
                          f"{len(net.mixed_ops)} / {len(net.betas)}: not this space")
    for m, a in zip(net.mixed_ops, alphas):
        a = torch.as_tensor(a).detach().float().cpu()
        if a.shape != m.alpha.shape:
            raise DeriveError(f"alpha of {m.kind} op at block {m.block} has shape {tuple(a.shape)}, expected "
                              f"{tuple(m.alpha.shape)}")
        m.alpha = torch.nn.Parameter(a.clone(), requires_grad=False)
    for i, b in enumerate(betas):
        b = torch.as_tensor(b).detach().float().cpu()
        if b.shape != net.betas[i].shape:
            raise DeriveError(f"beta of block {i} has shape {tuple(b.shape)}, expected {tuple(net.betas[i].shape)}")
        net.betas[i] = torch.nn.Parameter(b.clone(), requires_grad=False)
    return net


# --------------------------------------------------------------------------- deriving
def _mixed_op_label(m: Any) -> str:
    if m.kind == "head":
        return f"b{m.edge[1]} head from b{m.edge[0]}"
    return f"b{m.block} stack {m.layer}"


def derive_to_store(cfg: DeriveConfig, supernet: SuperNet, cost_model: Any, store: Any,
                    progress: Any = None) -> dict:
    """Derive from ``supernet``'s alpha/beta and write every artifact into ``store``; returns the result."""
    say = progress or (lambda msg: None)
    space = supernet.space
    target = getattr(supernet, "latency_target", None) or {}
    d = derive(supernet, cost_model, budget=cfg.latency_budget, build_arch=True,
               target=target.get("target_latency") if cfg.latency_budget is None else None,
               tolerance=target.get("target_tolerance") or 0.05)
    arch = d.arch
    say(f"path {d.path} (p={d.path_prob:.3g}), predicted {d.predicted_cost:.4g} {d.cost_units}: {arch.one_line()}")
    with torch.no_grad():
        probs = {e: float(p) for e, p in supernet.edge_probs().items()}
    latency = ExpectedLatency(supernet, cost_model)
    k_best = []
    for rank, (path, prob) in enumerate(k_best_paths(space, probs, cfg.k_best)):
        k_best.append({"rank": rank, "path": path, "probability": prob,
                       "predicted_latency": latency.path_cost(path, d.op_choice), "latency_units": latency.units})

    params = macs = None
    if cfg.count_macs:
        with torch.device("meta"):
            model = build_model(arch, num_classes=supernet.num_classes)
        params = int(count_params(model))
        macs = int(count_macs(model, space.input_size, space.in_channels))
    doc = arch.to_dict()
    store.put_bytes("arch.json", arch.to_json().encode())
    store.put_bytes("arch.official.txt", (arch.to_official() + "\n").encode())
    store.put_bytes("arch_one_line.txt", (arch.one_line() + "\n").encode())
    store.put_json("arch_params.json", arch_params_doc(supernet))
    store.put_json("k_best.json", {"k": cfg.k_best, "op_choice": d.op_choice, "paths": k_best})
    derivation = {"path": d.path, "path_prob": d.path_prob, "op_choice": d.op_choice, "blocks": d.blocks,
                  "predicted_latency": d.predicted_cost, "latency_units": d.cost_units,
                  "latency_budget": cfg.latency_budget, "official_from_derivation": d.official}
    store.put_json("derivation.json", derivation)
    pictures = []
    if cfg.diagram:
        pictures = _draw(supernet, d, probs, store)
        say(f"drew {', '.join(pictures)}")
    metrics = {"predicted_latency": d.predicted_cost, "path_prob": d.path_prob, "path_length": len(d.path),
               "num_layers": arch.num_layers}
    if params is not None:
        metrics.update(params=params, macs=macs)
    return {"arch": doc, "one_line": arch.one_line(), "official": arch.to_official(), "path": d.path,
            "op_choice": d.op_choice, "path_prob": d.path_prob, "predicted_latency": d.predicted_cost,
            "latency_units": d.cost_units, "params": params, "macs": macs, "k_best": k_best,
            "pictures": pictures, "metrics": {k: v for k, v in metrics.items() if v is not None}}


def _draw(supernet: SuperNet, d: Any, probs: Mapping[tuple[int, int], float], store: Any) -> list[str]:
    from jobs.diagrams import alpha_heatmap, beta_heatmap, path_diagram

    space = supernet.space
    heads = {tuple(b_edge): b["head"] for b_edge, b in zip(zip(d.path, d.path[1:]), d.blocks)}
    stacks = {b["block"]: b["stack"] for b in d.blocks}
    path_edges = set(zip(d.path, d.path[1:]))
    on_path = [(m.kind == "head" and tuple(m.edge) in path_edges) or (m.kind == "stack" and m.block in d.path[1:])
               for m in supernet.mixed_ops]
    with torch.no_grad():
        op_probs = [torch.softmax(m.alpha.float(), 0).tolist() for m in supernet.mixed_ops]
    names = []
    with tempfile.TemporaryDirectory() as tmp:
        cost = f", {d.predicted_cost:.3g} {d.cost_units}" if d.predicted_cost is not None else ""
        files = {
            "path_diagram.png": path_diagram(space, probs, d.path, Path(tmp) / "path_diagram.png", heads, stacks,
                                             title=f"derived path {d.path} (p={d.path_prob:.2f}{cost})"),
            "alpha_heatmap.png": alpha_heatmap([_mixed_op_label(m) for m in supernet.mixed_ops],
                                               [list(m.op_names) for m in supernet.mixed_ops], op_probs,
                                               Path(tmp) / "alpha_heatmap.png", chosen=d.op_choice, on_path=on_path),
            "beta_heatmap.png": beta_heatmap(space, probs, Path(tmp) / "beta_heatmap.png", path=d.path),
        }
        for key, path in files.items():
            store.put_file(key, path)
            names.append(key)
    return names


@dataclass(frozen=True)
class DeriveInputs:
    space: Any                      # a SearchSpace, or anything resolve_space takes
    search_outputs: Any             # alpha and beta: a search state, a SuperNet (state dict) or arch_params
    cost_model: Any                 # the search's cost model (jobs.profile.resolve_cost_model)
    num_classes: int | None = None  # None: what the search output records


class DeriveOutput(StageOutput):
    """The derived network (document and ``arch_key`` in the derive store), its path and predicted cost."""

    arch: dict[str, Any]
    arch_key: str = "arch.json"
    one_line: str
    official: str
    path: list[int]
    op_choice: list[int]
    path_prob: float
    predicted_latency: float | None
    latency_units: str | None
    params: int | None
    macs: int | None
    k_best: list[dict[str, Any]]
    pictures: list[str]


def run(cfg: DeriveConfig, inputs: DeriveInputs, ctx: StageContext) -> DeriveOutput:
    """Derive the network from the search's alpha/beta into ``ctx.store``."""
    space, cost_model, say = resolve_space(inputs.space), inputs.cost_model, ctx.progress
    net = supernet_from_search_outputs(space, inputs.search_outputs, inputs.num_classes)
    say(f"deriving from {len(net.mixed_ops)} alphas / {len(net.betas)} betas of {space.name} "
        f"({space.space_hash()[:12]}), cost model {getattr(cost_model, 'units', '?')}"
        + (f", budget {cfg.latency_budget}" if cfg.latency_budget else ""))
    out = DeriveOutput.model_validate(derive_to_store(cfg, net, cost_model, ctx.store, progress=say))
    ctx.tracker.log_dict(out.arch, "arch.json")
    ctx.tracker.log_metrics({k: float(v) for k, v in out.metrics.items() if _finite(v)})
    ctx.tracker.log_summary(tags={"densenas.arch": out.one_line})
    from jobs.diagrams import log_pictures

    log_pictures(ctx, ctx.store, out.pictures)
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))

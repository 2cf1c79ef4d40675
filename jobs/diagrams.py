"""Pictures of a DenseNAS derivation and of a sweep (matplotlib, Agg backend: no display on cluster nodes).

One function per picture; each takes plain data (the space, probabilities, rows), writes a PNG and
returns its path, so a stage uploads it and a test opens it.

- ``path_diagram``: the dense block graph. Blocks are nodes placed left to right in block order,
  at a height given by their width, with the stage / resolution bands shaded behind them; every
  edge is drawn faintly with a thickness that grows with its probability p(src -> dst); the
  derived (Viterbi) path is drawn on top in red with its head ops written on it.
- ``alpha_heatmap``: softmax(alpha) of every mixed op (rows) over its candidate ops (columns).
- ``beta_heatmap``: p(src -> dst) as a source x destination matrix (the last column is the final 1x1 conv).
- ``pareto_plot``: every sweep trial by latency and accuracy, the non-dominated ones joined and
  highlighted, each point labelled with its lambda / tau.
- ``search_evolution``: how the search moved alpha and beta, epoch by epoch: p(finally chosen op)
  of every mixed op, and p(edge) of every edge with the derived path's edges in red.

``log_pictures(ctx, store, keys)`` logs PNGs a stage put in its store to the stage's MLflow run
(the store copy stays; tracking trouble never fails the stage).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: worker nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

__all__ = ["path_diagram", "alpha_heatmap", "beta_heatmap", "pareto_plot", "search_evolution", "short_op",
           "log_pictures"]

PATH_COLOR = "#d62728"
EDGE_COLOR = "#1f4e79"


def short_op(name: str) -> str:
    """``mbconv_k5_e6`` -> ``k5e6``; other names unchanged."""
    if name.startswith("mbconv_"):
        return name[len("mbconv_"):].replace("_", "")
    return name


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def path_diagram(space: Any, edge_probs: Mapping[tuple[int, int], float], path: Sequence[int], out: str | Path,
                 head_ops: Mapping[tuple[int, int], str] | None = None,
                 stack_ops: Mapping[int, Sequence[str]] | None = None, title: str | None = None) -> Path:
    """The dense block graph with edge thickness ~ p and the derived ``path`` highlighted.

    ``head_ops`` ((src, dst) -> op) and ``stack_ops`` (block -> ops, skips removed) label the path.
    """
    blocks = list(space.blocks)
    end = space.end_node
    n = len(blocks)
    xs = {b.index: float(b.index) for b in blocks}
    xs[end] = float(n) + 0.3
    widths = [b.width for b in blocks]
    # Height by width on a log scale (widths grow geometrically), the end node above the widest block.
    w_lo, w_hi = math.log(min(widths)), math.log(max(widths) * 1.6)
    span = max(w_hi - w_lo, 1e-6)

    def height(w: float) -> float:
        return (math.log(w) - w_lo) / span

    ys = {b.index: height(b.width) for b in blocks}
    last = space.last_conv_channels
    ys[end] = height(max(widths) * 1.6) if last is None else min(1.0, height(max(widths)) + 0.18)

    fig_w = max(7.0, 0.85 * (n + 1) + 1.5)
    fig, ax = plt.subplots(figsize=(fig_w, 5.0), dpi=110)
    ax.set_title(title or f"derived path {list(path)} through {getattr(space, 'name', None) or 'the space'}",
                 fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    # Resolution bands: consecutive blocks of one resolution share a shaded background.
    shades = ["#f2f2f2", "#e3eaf3"]
    start = 0
    k = 0
    for i in range(1, n + 1):
        if i == n or blocks[i].resolution != blocks[start].resolution:
            ax.axvspan(start - 0.45, i - 0.55, color=shades[k % 2], zorder=0)
            ax.text((start + i - 1) / 2, -0.2, f"{blocks[start].resolution}x{blocks[start].resolution}",
                    ha="center", va="center", fontsize=8, color="0.35")
            start, k = i, k + 1

    # Fix the axes geometry first: arc label positions are computed in display space below.
    ax.set_xlim(-0.7, xs[end] + 0.7)
    ax.set_ylim(-0.32, 1.22)
    fig.tight_layout()
    to_disp, to_data = ax.transData.transform, ax.transData.inverted().transform

    def bend(i: int, j: int) -> float:
        # Edges that skip blocks arc upwards, longer ones higher, so they clear the nodes in between.
        return 0.0 if j - i <= 1 or j == end else -0.22 - 0.04 * min(j - i, 4)

    def arc_middle(i: int, j: int) -> tuple[float, float]:
        (x1, y1), (x2, y2) = to_disp((xs[i], ys[i])), to_disp((xs[j], ys[j]))
        f = bend(i, j)
        cx, cy = (x1 + x2) / 2 + f * (y2 - y1), (y1 + y2) / 2 - f * (x2 - x1)   # matplotlib's arc3 control point
        return tuple(to_data((0.25 * x1 + 0.5 * cx + 0.25 * x2, 0.25 * y1 + 0.5 * cy + 0.25 * y2)))

    probs = {e: float(p) for e, p in edge_probs.items()}
    on_path = set(zip(path, list(path[1:]) + [end]))
    for (i, j, _s) in space.edges:
        p = probs.get((i, j), 0.0)
        if (i, j) in on_path:
            continue
        arrow = FancyArrowPatch((xs[i], ys[i]), (xs[j], ys[j]), connectionstyle=f"arc3,rad={bend(i, j)}",
                                arrowstyle="-|>", mutation_scale=7, lw=0.4 + 4.0 * p,
                                color=EDGE_COLOR, alpha=0.18 + 0.35 * p, zorder=1, shrinkA=9, shrinkB=9)
        ax.add_patch(arrow)
    for (i, j) in on_path:
        p = probs.get((i, j), 0.0)
        ax.add_patch(FancyArrowPatch((xs[i], ys[i]), (xs[j], ys[j]), connectionstyle=f"arc3,rad={bend(i, j)}",
                                     arrowstyle="-|>", mutation_scale=10, lw=1.5 + 4.0 * p,
                                     color=PATH_COLOR, alpha=0.9, zorder=3, shrinkA=9, shrinkB=9))
        label = short_op(head_ops[(i, j)]) if head_ops and (i, j) in head_ops else ""
        mx, my = arc_middle(i, j)
        ax.text(mx, my + 0.03, f"{label}\np={p:.2f}" if label else f"p={p:.2f}", ha="center", va="bottom",
                fontsize=7, color=PATH_COLOR, zorder=5,
                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))

    stage_colors = plt.get_cmap("Set2")  # no red: red is the path
    for b in blocks:
        chosen = b.index in path
        ax.scatter([xs[b.index]], [ys[b.index]], s=420 if chosen else 300, zorder=4,
                   color=stage_colors(b.stage % 8), edgecolors=PATH_COLOR if chosen else "0.3",
                   linewidths=2.2 if chosen else 0.8)
        ax.text(xs[b.index], ys[b.index], str(b.width), ha="center", va="center", fontsize=7, zorder=6,
                color="black", fontweight="bold")
        ax.text(xs[b.index], ys[b.index] - 0.085, f"b{b.index}", ha="center", va="top", fontsize=7, color="0.2")
        if chosen and stack_ops and stack_ops.get(b.index):
            ax.text(xs[b.index], ys[b.index] - 0.14, "\n".join(short_op(o) for o in stack_ops[b.index]),
                    ha="center", va="top", fontsize=6, color=PATH_COLOR)
    ax.scatter([xs[end]], [ys[end]], s=420, marker="s", color="0.25", zorder=4)
    ax.text(xs[end], ys[end], str(last) if last else "fc", ha="center", va="center", fontsize=6.5,
            color="white", zorder=6)
    ax.text(xs[end], ys[end] - 0.085, "1x1 conv" if last else "classifier", ha="center", va="top", fontsize=7)

    # Legend: stages by colour, the path.
    stages = sorted({b.stage for b in blocks})
    handles = [plt.Line2D([], [], marker="o", ls="", color=stage_colors(s % 8), label=f"stage {s}") for s in stages]
    handles.append(plt.Line2D([], [], color=PATH_COLOR, lw=2.5, label="derived path"))
    handles.append(plt.Line2D([], [], color=EDGE_COLOR, lw=2, alpha=0.4, label="edge (width ~ p)"))
    ax.legend(handles=handles, loc="upper left", fontsize=7, ncol=2, frameon=False)
    ax.set_yticks([])
    ax.set_xticks([])
    for s in ("top", "right", "left", "bottom"):
        ax.spines[s].set_visible(False)
    ax.text(0.995, 0.995, "node: block width; height ~ log(width)", transform=ax.transAxes, ha="right",
            va="top", fontsize=7, color="0.4")
    return _save(fig, out)


def _heatmap(ax: Any, data: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str],
             highlight: Sequence[tuple[int, int]] = (), vmax: float = 1.0, fmt: str = "{:.2f}") -> Any:
    masked = np.ma.masked_invalid(data)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    im = ax.imshow(masked, aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(col_labels)), labels=col_labels, fontsize=7, rotation=30, ha="right")
    ax.set_yticks(range(len(row_labels)), labels=row_labels, fontsize=7)
    if data.size <= 600:
        for r in range(data.shape[0]):
            for c in range(data.shape[1]):
                v = data[r, c]
                if np.isfinite(v):
                    ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=6,
                            color="white" if v < 0.55 * vmax else "black")
    for (r, c) in highlight:
        ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec=PATH_COLOR, lw=1.6))
    return im


def alpha_heatmap(rows: Sequence[str], op_names: Sequence[Sequence[str]], probs: Sequence[Sequence[float]],
                  out: str | Path, chosen: Sequence[int] | None = None, on_path: Sequence[bool] | None = None,
                  title: str = "softmax(alpha) per mixed op") -> Path:
    """One row per mixed op (``rows`` labels), one column per candidate op name (union of all rows'
    names, in first-seen order); a cell is empty where that op is not a candidate of that layer.
    ``chosen`` (argmax per row) is outlined; rows ``on_path`` are labelled in bold red."""
    cols: list[str] = []
    for names in op_names:
        for o in names:
            if o not in cols:
                cols.append(o)
    data = np.full((len(rows), len(cols)), np.nan)
    for r, (names, ps) in enumerate(zip(op_names, probs)):
        for o, p in zip(names, ps):
            data[r, cols.index(o)] = float(p)
    highlight = []
    if chosen is not None:
        highlight = [(r, cols.index(op_names[r][c])) for r, c in enumerate(chosen)]
    vmax = float(np.nanmax(data)) if np.isfinite(data).any() else 1.0
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(cols) + 2.5), max(3.0, 0.2 * len(rows) + 1.4)), dpi=110)
    im = _heatmap(ax, data, rows, [short_op(c) for c in cols], highlight, vmax=max(vmax, 1e-6))
    if on_path is not None:
        for lbl, hit in zip(ax.get_yticklabels(), on_path):
            if hit:
                lbl.set_color(PATH_COLOR)
                lbl.set_fontweight("bold")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    ax.set_title(title + " (outlined: argmax; red rows: on the derived path)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def beta_heatmap(space: Any, edge_probs: Mapping[tuple[int, int], float], out: str | Path,
                 path: Sequence[int] | None = None, title: str = "p(src -> dst) = softmax(beta_src)") -> Path:
    """Source block (rows) x destination (columns, the last one the final 1x1 conv); empty: no edge."""
    n = len(space.blocks)
    end = space.end_node
    srcs = [b.index for b in space.blocks if space.out_edges(b.index)]
    dsts = list(range(1, n)) + [end]
    data = np.full((len(srcs), len(dsts)), np.nan)
    for (i, j), p in edge_probs.items():
        if i in srcs and j in dsts:
            data[srcs.index(i), dsts.index(j)] = float(p)
    highlight = []
    if path is not None:
        for i, j in zip(path, list(path[1:]) + [end]):
            if i in srcs:
                highlight.append((srcs.index(i), dsts.index(j)))
    rows = [f"b{i} ({space.blocks[i].width}@{space.blocks[i].resolution})" for i in srcs]
    cols = [f"b{j}" for j in dsts[:-1]] + ["end"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(cols) + 2.5), max(3.0, 0.35 * len(rows) + 1.4)), dpi=110)
    im = _heatmap(ax, data, rows, cols, highlight)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    ax.set_xlabel("destination block")
    ax.set_ylabel("source block (width@resolution)")
    ax.set_title(title + " (outlined: derived path)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def pareto_plot(rows: Sequence[Mapping[str, Any]], out: str | Path, accuracy: str = "accuracy",
                latency: str = "latency", label_keys: Sequence[str] = ("lambda", "tau"),
                latency_label: str = "latency", accuracy_label: str = "accuracy",
                title: str | None = None, extra: Sequence[Mapping[str, Any]] = (),
                extra_label: str = "baseline") -> Path:
    """Every row as a point (latency on x, accuracy on y); rows with ``pareto`` true are highlighted
    and joined as a step line; each point is labelled ``lambda/tau`` from ``label_keys``.
    ``extra`` rows (e.g. random-path baselines) are drawn as grey crosses without labels."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=110)
    ok = [r for r in rows if r.get(accuracy) is not None and r.get(latency) is not None]
    dominated = [r for r in ok if not r.get("pareto")]
    front = sorted((r for r in ok if r.get("pareto")), key=lambda r: float(r[latency]))
    if extra:
        ex = [r for r in extra if r.get(accuracy) is not None and r.get(latency) is not None]
        ax.scatter([float(r[latency]) for r in ex], [float(r[accuracy]) for r in ex], marker="x", s=22,
                   color="0.6", label=extra_label, zorder=2)
    ax.scatter([float(r[latency]) for r in dominated], [float(r[accuracy]) for r in dominated], s=36,
               color="#7f7f7f", label="dominated trial", zorder=3)
    if front:
        fx = [float(r[latency]) for r in front]
        fy = [float(r[accuracy]) for r in front]
        ax.step(fx, fy, where="post", color=PATH_COLOR, lw=1.2, alpha=0.7, zorder=3)
        ax.scatter(fx, fy, s=70, color=PATH_COLOR, edgecolors="black", linewidths=0.6,
                   label="Pareto front", zorder=4)
    for r in ok:
        parts = []
        for k in label_keys:
            if r.get(k) is not None:
                v = r[k]
                sym = {"lambda": "\u03bb", "tau": "\u03c4"}.get(k, k)
                parts.append(f"{sym}={v:g}" if isinstance(v, (int, float)) else f"{sym}={v}")
        ax.annotate(" ".join(parts), (float(r[latency]), float(r[accuracy])), textcoords="offset points",
                    xytext=(5, 5), fontsize=7, color=PATH_COLOR if r.get("pareto") else "0.3")
    if not ok:
        ax.text(0.5, 0.5, "no trial reported both metrics", transform=ax.transAxes, ha="center")
    ax.set_xlabel(latency_label)
    ax.set_ylabel(accuracy_label)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or f"sweep: {len(ok)} trials, {len(front)} on the Pareto front", fontsize=10)
    ax.margins(0.12)
    fig.tight_layout()
    return _save(fig, out)


def search_evolution(snapshots: Sequence[Mapping[str, Any]], out: str | Path,
                     title: str = "search evolution") -> Path:
    """``snapshots``: one per epoch, ``{"epoch", "phase", "labels", "alphas", "edge_probs", "path"}``
    (``jobs.epochs.save_arch_snapshot``). Left: p(the last epoch's argmax op) of each mixed op; right:
    p(src -> dst) of each edge, the last epoch's derived path in red; warm-up epochs shaded."""
    snaps = sorted(snapshots, key=lambda s: int(s["epoch"]))
    epochs = [int(s["epoch"]) for s in snaps]
    last = snaps[-1]
    chosen = [int(np.argmax(a)) for a in last["alphas"]]
    path = list(last.get("path") or [])
    path_edges = {f"{i}-{j}" for i, j in zip(path, path[1:])}
    if path and last["edge_probs"]:   # the path's last block feeds the end node (the largest index)
        path_edges.add(f"{path[-1]}-{max(int(k.split('-')[1]) for k in last['edge_probs'])}")
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11.0, 4.2), dpi=110, sharex=True)
    warm = [e for e, s in zip(epochs, snaps) if s.get("phase") == "warmup"]
    for ax in (ax_a, ax_b):
        if warm:
            ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="0.92", zorder=0, label="warm-up")
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(-0.02, 1.02)
    cmap = plt.get_cmap("tab20")
    for r, label in enumerate(last["labels"]):
        ys = [s["alphas"][r][chosen[r]] if r < len(s["alphas"]) else np.nan for s in snaps]
        ax_a.plot(epochs, ys, lw=1.0, color=cmap(r % 20), alpha=0.85,
                  label=label if len(last["labels"]) <= 12 else None)
    ax_a.set_ylabel("p(final argmax op) = softmax(alpha)")
    ax_a.set_title(f"alpha: {len(last['labels'])} mixed ops", fontsize=9)
    if len(last["labels"]) <= 12:
        ax_a.legend(fontsize=6, loc="best")
    for key in sorted(last["edge_probs"], key=lambda k: tuple(int(x) for x in k.split("-"))):
        ys = [float(s["edge_probs"].get(key, np.nan)) for s in snaps]
        on = key in path_edges
        ax_b.plot(epochs, ys, lw=1.8 if on else 0.8, color=PATH_COLOR if on else EDGE_COLOR,
                  alpha=1.0 if on else 0.35, zorder=3 if on else 2)
        if on:
            ax_b.annotate(key, (epochs[-1], ys[-1]), textcoords="offset points", xytext=(3, 0), fontsize=7,
                          color=PATH_COLOR)
    ax_b.set_ylabel("p(src -> dst) = softmax(beta_src)")
    ax_b.set_title(f"beta: {len(last['edge_probs'])} edges (red: derived path {path})", fontsize=9)
    fig.suptitle(f"{title}: epochs {epochs[0]}-{epochs[-1]}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def log_pictures(ctx: Any, store: Any, keys: Sequence[str], artifact_path: str | None = None) -> int:
    """Log the PNGs ``keys`` of ``store`` to the stage's MLflow run (``ctx.tracker``); returns how many
    were handed to the tracker. Without tracking, or when a picture is missing, it does nothing."""
    import tempfile

    if not ctx.tracker.enabled:
        return 0
    log_artifact = ctx.tracker.log_artifact
    sent = 0
    with tempfile.TemporaryDirectory(prefix="densenas-pictures-") as tmp:
        for key in keys:
            try:
                if not store.exists(key):
                    continue
                local = Path(tmp) / Path(key).name
                local.write_bytes(store.get_bytes(key))
                log_artifact(local, artifact_path)   # sent now, or copied into the tracker's spool
                sent += 1
            except Exception as e:  # noqa: BLE001 -- a picture never fails a stage
                print(f"tracking: picture {key} not logged ({type(e).__name__}: {e})", flush=True)
    return sent

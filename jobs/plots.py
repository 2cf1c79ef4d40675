"""PNG plots of the pipeline's stages (matplotlib, Agg backend: no display needed on cluster nodes).

One small function per plot; each takes plain numbers and writes a PNG file, returning its path,
so a stage can upload it to the store and a test can open it.

- ``latency_scatter``: predicted (table sum) vs measured latency of whole networks, with the
  y = x line, the +-10 % band and, optionally, the corrected predictions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: worker nodes have no display
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["latency_scatter"]


def latency_scatter(predicted: Sequence[float], measured: Sequence[float], path: str | Path,
                    corrected: Sequence[float] | None = None, units: str = "ms", title: str | None = None,
                    corrected_label: str = "corrected") -> Path:
    """Scatter of predicted vs measured latency per network; writes ``path`` (PNG) and returns it."""
    if len(predicted) != len(measured):
        raise ValueError(f"predicted and measured differ in length ({len(predicted)} vs {len(measured)})")
    path = Path(path)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    try:
        values = list(predicted) + list(measured) + list(corrected or [])
        lo, hi = min(values) * 0.9, max(values) * 1.1
        ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="0.9", label="+-10 %")
        ax.plot([lo, hi], [lo, hi], color="0.4", lw=1, label="predicted = measured")
        ax.scatter(measured, predicted, s=16, label="table sum")
        if corrected is not None:
            ax.scatter(measured, corrected, s=16, marker="x", label=corrected_label)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel(f"measured latency ({units})")
        ax.set_ylabel(f"predicted latency ({units})")
        ax.set_title(title or f"latency table vs measured, {len(measured)} nets")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path

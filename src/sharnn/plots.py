"""Pictures (`sharnn plot`, `sharnn attention`): learning curves of runs, and where the attention looks.

matplotlib is an optional extra (`pip install 'sharnn[plot]'`). Figures are drawn without pyplot (no global
state, no display needed) and written as PNG or SVG, as the output file's name says.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .attention_map import AttentionMap, AttentionUse, token_label
from .curves import Curves
from .errors import SharnnError
from .outputs import staged_files

FORMATS = ("png", "svg")


def image_format(out: str | os.PathLike) -> str:
    """"png" or "svg" from the file name; SharnnError for anything else."""
    fmt = Path(out).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise SharnnError(f"cannot tell the image format of {out}: give -o a name ending in .png or .svg")
    return fmt


def new_figure(**kw: Any) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SharnnError("drawing needs matplotlib, which is not installed: pip install 'sharnn[plot]'") from None
    return Figure(**kw)


def save(fig: Any, out: str | os.PathLike) -> None:
    """Write the figure to `out` under a temporary name beside it, renamed into place once complete."""
    out = Path(out)
    try:
        with staged_files(out.parent) as tmp:
            fig.savefig(tmp / out.name, format=image_format(out), dpi=120)
    except OSError as e:
        raise SharnnError(f"cannot write {out}: {e.strerror}") from None


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds < 120:
        return 1.0, "s"
    return (60.0, "min") if seconds < 3 * 3600 else (3600.0, "h")


def curves_figure(runs: Sequence[Curves], unit: str = "bpc") -> Any:
    """bpc against optimizer steps (left) and training time (right); one colour per run, training bpc as a thin
    line, validation as dots on a thick line, learning rate dotted on the right-hand axis."""
    fig = new_figure(figsize=(13, 5), layout="constrained")
    by_step, by_time = fig.subplots(1, 2)
    longest = max((p.seconds for r in runs for p in r.train + r.valid), default=0.0)
    scale, time_unit = _time_unit(longest)
    lr_axes = [by_step.twinx(), by_time.twinx()]
    colours = [f"C{i % 10}" for i in range(len(runs))]
    tops = []
    for run, colour in zip(runs, colours):
        label = run.name + "".join(f", final {k.split('_')[0]} {v:.4f}" for k, v in run.final.items())
        for ax, lr_ax, x in ((by_step, lr_axes[0], "step"), (by_time, lr_axes[1], "seconds")):
            div = 1.0 if x == "step" else scale
            if run.train:
                ax.plot([getattr(p, x) / div for p in run.train], [p.value for p in run.train], color=colour,
                        lw=0.8, alpha=0.55, label=f"{label}: train")
            if run.valid:
                ax.plot([getattr(p, x) / div for p in run.valid], [p.value for p in run.valid], color=colour,
                        lw=2, marker="o", ms=4, label=f"{label}: valid")
            if run.lr:
                lr_ax.plot([getattr(p, x) / div for p in run.lr], [p.value for p in run.lr], color=colour, lw=1,
                           ls=":", label=f"{run.name}: learning rate")
        values = [p.value for p in run.train]
        # The first batches' bpc (8 bits for bytes) would squash the rest: clip the axis at what follows them.
        tops.append(max([*(p.value for p in run.valid), float(np.percentile(values, 95)) if values else 0.0]))
    if tops and max(tops) > 0:
        low = min((p.value for r in runs for p in r.train + r.valid), default=0.0)
        by_step.set_ylim(bottom=max(0.0, low - 0.05 * (max(tops) - low)), top=max(tops) * 1.05)
        by_time.set_ylim(*by_step.get_ylim())
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel(f"training time ({time_unit})")
    for ax in (by_step, by_time):
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    for lr_ax in lr_axes:
        lr_ax.set_ylabel("learning rate (dotted)")
        lr_ax.set_ylim(bottom=0)
    by_step.legend(fontsize=7, loc="upper right")
    by_step.set_title(f"{unit} against steps")
    by_time.set_title(f"{unit} against training time")
    return fig


def attention_figure(maps: Sequence[AttentionMap], uses: Sequence[AttentionUse], ids: Sequence[int], vocab: Any,
                     span: int) -> Any:
    """One row per attention block: a heat-map of a short window (queries against the keys before and among
    them; the first column is the weight on everything older), the mean attention distance of every query of
    the text, and the weight by distance."""
    fig = new_figure(figsize=(18, 5.5 * len(maps)), layout="constrained")
    from matplotlib.colors import PowerNorm  # (new_figure said it if matplotlib is missing)

    rows = fig.subfigures(len(maps), 1, squeeze=False)[:, 0]
    for row, m, use in zip(rows, maps, uses):
        heat, per_query, by_dist = row.subplots(1, 3, width_ratios=[2.2, 1, 1])
        image = np.concatenate([m.older[:, None], m.weights], axis=1)  # (W, 1 + C)
        shown = heat.imshow(image, aspect="auto", cmap="magma_r", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0),
                            interpolation="nearest")
        keys = [token_label(vocab, t) for t in ids[m.key_start : m.key_start + m.weights.shape[1]]]
        queries = [token_label(vocab, t) for t in ids[m.start : m.start + m.weights.shape[0]]]
        heat.set_xticks(range(len(keys) + 1), ["older", *keys], fontsize=6, family="monospace", rotation=90)
        heat.set_yticks(range(len(queries)), queries, fontsize=6, family="monospace")
        heat.axvline(0.5, color="0.5", lw=0.8)
        heat.set_xlabel(f"key (memory and window), positions {m.key_start}-{m.key_start + len(keys) - 1}")
        heat.set_ylabel(f"query, positions {m.start}-{m.start + len(queries) - 1}")
        heat.set_title(f"block {m.block}: attention weights (square-root colour scale)")
        row.colorbar(shown, ax=heat, shrink=0.8)

        t = np.arange(len(use.mean_distance))
        per_query.plot(t, use.mean_distance, lw=0.4, alpha=0.5, color="C0", label="each query")
        k = max(1, min(200, len(t) // 20))
        if len(t) >= k:
            smooth = np.convolve(use.mean_distance, np.ones(k) / k, mode="valid")
            per_query.plot(t[k - 1 :], smooth, lw=1.8, color="C0", label=f"mean of {k}")
        per_query.axhline(span - 1, color="C3", ls="--", lw=1, label=f"farthest reachable ({span - 1})")
        per_query.set_xlabel("query position in the text")
        per_query.set_ylabel("average attention distance (positions back)")
        per_query.set_title("how far back each query looks, on average")
        per_query.legend(fontsize=7)

        d = np.arange(len(use.by_distance))
        cum = np.cumsum(use.by_distance)
        by_dist.loglog(d + 1, np.maximum(use.by_distance, 1e-12), lw=1, color="C0")
        by_dist.set_ylim(bottom=max(1e-7, float(use.by_distance[use.by_distance > 0].min(initial=1.0))))
        by_dist.set_xlabel("distance + 1 (1 = the query itself)")
        by_dist.set_ylabel("weight, averaged over the text's queries")
        within = [int(np.searchsorted(cum, q * cum[-1])) for q in (0.5, 0.9, 0.99)] if cum[-1] > 0 else []
        by_dist.set_title("weight by distance")
        by_dist.text(0.03, 0.03, "\n".join(f"{q}% of the weight within {w} positions"
                                            for q, w in zip((50, 90, 99), within)),
                     transform=by_dist.transAxes, fontsize=8, va="bottom")
        twin = by_dist.twinx()
        twin.semilogx(d + 1, cum, color="C1", lw=1)
        twin.set_ylim(0, 1.02)
        twin.set_ylabel("cumulative weight", color="C1")
    return fig

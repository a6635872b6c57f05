"""Pictures: training curves from a run's metrics.csv, and attention heatmaps.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so plotting needs no
display, leaves no global figure state behind, and works the same in a server or test.
PNGs are written atomically like every other file we write.
"""

from __future__ import annotations

import csv
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .files import InputError, atomic_write
from .translate import Translation

CURVES = {  # panel -> (csv column, legend label, line style)
    "loss": [("train/loss", "train", "-"), ("val/loss", "validation", "o-")],
    "validation score": [("val/bleu", "BLEU", "o-"), ("val/chrf", "chrF", "s--")],
}


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Column -> [(step, value)] for every non-empty cell of a Lightning CSVLogger file.

    The logger writes one row per logging call, each filling only its own columns.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for column, value in row.items():
                if column not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(column, []).append((int(float(step)), float(value)))
    return series


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


def _draw(ax, points: list[tuple[int, float]], label: str, style: str) -> None:
    ax.plot([s for s, _ in points], [v for _, v in points], style, label=label, markersize=3)


def training_figure(series: dict[str, list[tuple[int, float]]], title: str) -> Figure:
    """Loss, validation BLEU/chrF and learning rate against step, one panel each."""
    lr_columns = sorted(c for c in series if c.startswith("lr-"))
    fig = Figure(figsize=(8, 9), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    for ax, (panel, curves) in zip(axes, CURVES.items()):
        for column, label, style in curves:
            if series.get(column):
                _draw(ax, series[column], label, style)
        ax.set_ylabel(panel)
    lr_ax = axes[2]
    for column in lr_columns:
        # the rate holds between logged values: draw it as a staircase
        steps, values = zip(*series[column])
        lr_ax.step(steps, values, where="post", label=column.removeprefix("lr-"))
    rates = [v for c in lr_columns for _, v in series[c]]
    if rates and min(rates) > 0 and max(rates) / min(rates) >= 10:
        lr_ax.set_yscale("log")  # many halvings read best as equal steps
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    for ax in axes:
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def plot_training(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw RUN_DIR/logs/metrics.csv into a PNG (default RUN_DIR/training.png); returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run directory not found: {run_dir}")
    metrics = run_dir / "logs" / "metrics.csv"
    if not metrics.is_file():
        raise InputError(f"no training log at {metrics} (curves need a run trained with logger=csv, the default)")
    series = read_metrics(metrics)
    wanted = [c for curves in CURVES.values() for c, _, _ in curves]
    if not any(series.get(c) for c in wanted):
        raise InputError(f"{metrics} has no loss or validation values yet "
                         f"(columns found: {', '.join(sorted(series)) or 'none'})")
    title = run_dir.resolve().name
    if series.get("val/bleu"):
        step, bleu = max(series["val/bleu"], key=lambda p: p[1])
        title += f" (best validation BLEU {bleu:.2f} at step {step})"
    return _save(training_figure(series, title), Path(output) if output else run_dir / "training.png")


def plot_attention(translation: Translation, path: str | Path) -> Path:
    """A heatmap of one translation's attention: source subwords across, output subwords down.

    Rows are decoder steps: the output subwords, then </s> when the search finished
    with it (a hypothesis cut at the length limit has no </s> row).
    """
    if translation.attention is None or translation.source_pieces is None:
        raise ValueError("this translation carries no attention; "
                         "translate with translate_hypotheses(..., return_attention=True)")
    weights = translation.attention.float().cpu().numpy()  # (steps, source subwords + EOS)
    n_out, n_src = weights.shape
    rows = (list(translation.pieces) + ["</s>"])[:n_out]
    # about a third of an inch per cell keeps labels legible; very long sentences shrink
    # the cells rather than making a picture too large to open
    cell = min(0.32, 24.0 / max(n_out, n_src, 1))
    fontsize = max(4.0, min(9.0, cell * 28))
    fig = Figure(figsize=(max(4.0, n_src * cell + 2.2), max(3.0, n_out * cell + 1.6)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="equal", interpolation="nearest")
    ax.set_xticks(range(n_src), translation.source_pieces, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n_out), rows, fontsize=fontsize)
    ax.set_xlabel("source subwords")
    ax.set_ylabel("output subwords")
    ax.xaxis.set_label_position("top")
    ax.tick_params(top=True, labeltop=True, bottom=False, labelbottom=False)
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    # a title, not a side label: a one-row picture's bar is too short for a side label
    bar.ax.set_title("weight", fontsize="small")
    return _save(fig, Path(path))

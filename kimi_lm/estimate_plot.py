"""The estimator's plot: total memory against context for a model, beside its all-MLA and plain-MHA variants, with
a line at each device's usable memory (``kimi-lm estimate --plot``, docs/memory.png).

Reference: matplotlib's object-oriented API (``Figure`` + Agg canvas: no global pyplot state).
"""

from __future__ import annotations

from pathlib import Path

from kimi_lm.errors import CheckpointError
from kimi_lm.estimate import GIB, KIB, estimate, fmt_tokens
from kimi_lm.files import atomic_path


def plot(config, path: str | Path, **kw) -> None:
    """Total memory against context (1k…1M, log-log) for this model, the same with every layer MLA and with plain
    MHA, and a line at each device's usable memory. Written atomically (``files.atomic_path``)."""
    fig = figure(config, **kw)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def figure(config, **kw):
    """The matplotlib Figure :func:`plot` writes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise CheckpointError("--plot needs matplotlib (pip install matplotlib)") from None
    xs = [KIB << i for i in range(11)]  # 1k … 1M
    e = estimate(config, context=xs, **kw)
    base = [r["total_bytes"] - r["cache_bytes"] for r in e.per_context]  # weights + activations
    n_kda = len(e.arch["kda_layers"])
    series = [(f"this model ({n_kda} KDA + {e.arch['num_layers'] - n_kda} MLA)" if n_kda else "this model (MLA)",
               "this_model", "-")]
    series += [(f"every layer MLA ({e.arch['num_layers']})", "all_mla", "--")] if n_kda else []
    series += [(f"plain MHA ({e.arch['num_layers']} layers)", "mha", ":")]
    fig = Figure(figsize=(10, 5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = []
    for label, key, style in series:
        ys += [(b + c) / GIB for b, c in zip(base, e.comparison[key])]
        ax.plot(xs, ys[-len(xs):], style, lw=2, label=label)
    lines: dict[float, list[str]] = {}  # usable GiB -> device labels: devices of one size share a line and a label
    for d in e.devices.values():  # devices whose line falls in the plotted range
        y = d["usable_bytes"] / GIB
        if min(ys) / 1.5 <= y <= max(ys) * 1.5:
            lines.setdefault(y, []).append(d["label"])
    for y, labels in sorted(lines.items()):
        ax.axhline(y, color="grey", lw=0.8, alpha=0.6)
        ax.text(xs[0], y, f" {' / '.join(labels)} (usable {y:.0f} GiB)", fontsize=7, va="bottom", color="dimgrey",
                in_layout=False)
    ax.set(xscale="log", yscale="log", xlabel="context (tokens per sequence)", ylabel="memory (GiB)",
           title=f"{e.model}: weights {e.quant}, cache {e.cache_dtype}, batch {e.batch}")
    ax.set_xticks(xs[::2], [fmt_tokens(x) for x in xs[::2]])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if f"{y:g}"[0] in "25" else ""))
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="weights + activations + cache",
              title_fontsize=8)
    _separate_labels(fig, ax)
    return fig


def _separate_labels(fig, ax) -> None:
    """Device lines close together would print their labels on top of each other: from the lowest up, a label that
    overlaps one already placed moves right, past it."""
    fig.canvas.draw()  # the final layout: pixel extents of the texts are known from here on
    renderer, placed = fig.canvas.get_renderer(), []
    for text in sorted(ax.texts, key=lambda t: t.get_position()[1]):
        box = text.get_window_extent(renderer)
        while clash := [p for p in placed if box.overlaps(p)]:
            text.set_x(ax.transData.inverted().transform((max(p.x1 for p in clash) + 8, box.y0))[0])
            box = text.get_window_extent(renderer)
        placed.append(box)



# ---- command line --------------------------------------------------------------------------------------------------

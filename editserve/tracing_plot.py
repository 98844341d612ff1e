"""Heatmaps of causal traces in the style of the ROME paper (Meng et al., 2022, Fig. 1).

One row per prompt token (subject tokens starred), one column per layer, colour = P(o) after
restoring that state, from the corrupted P(o) (white) up; purple for the residual stream, green
for MLP and red for attention windows. Uses matplotlib's object API with the Agg canvas, so it
touches no global pyplot state and is safe in servers and threads.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from editserve.editing.tracing import TraceResult

_STYLE = {
    "hidden": ("Purples", "single restored layer within {model}", "Impact of restoring state after corrupted input"),
    "mlp": ("Greens", "center of interval of {window} restored MLP layers", "Impact of restoring MLP after corrupted input"),
    "attn": ("Reds", "center of interval of {window} restored Attn layers", "Impact of restoring Attn after corrupted input"),
}


def _figure(result: TraceResult, model_name: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cmap, xlabel, title = _STYLE[result.kind]
    n_tokens, n_layers = len(result.tokens), result.num_layers
    fig = Figure(figsize=(max(3.5, 0.12 * n_layers + 1.6), max(2.0, 0.26 * n_tokens + 0.9)), dpi=200)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    vmin = min(result.p_corrupted, min(min(row) for row in result.scores))
    mesh = ax.pcolormesh(
        [[float(x) for x in row] for row in result.scores], cmap=cmap, vmin=vmin,
        vmax=max(vmin + 1e-6, max(max(row) for row in result.scores)),
    )
    ax.invert_yaxis()
    s0, s1 = result.subject_range
    labels = [repr(t)[1:-1] + ("*" if s0 <= i < s1 else "") for i, t in enumerate(result.tokens)]
    ax.set_yticks([0.5 + i for i in range(n_tokens)])
    ax.set_yticklabels(labels, fontsize=7)
    step = 5 if n_layers > 12 else 1
    ax.set_xticks([0.5 + i for i in range(0, n_layers, step)])
    ax.set_xticklabels(list(range(0, n_layers, step)), fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(xlabel.format(model=model_name, window=result.window), fontsize=7)
    cb = fig.colorbar(mesh, ax=ax)
    cb.ax.tick_params(labelsize=6)
    cb.ax.set_title(f"p({result.target.strip() or result.target!r})", y=-0.12, fontsize=7)
    fig.tight_layout()
    return fig


def render_png(result: TraceResult, model_name: str = "the model") -> bytes:
    """The heatmap of `result` as PNG bytes (e.g. for an RPC response)."""
    buf = io.BytesIO()
    _figure(result, model_name).savefig(buf, format="png")
    return buf.getvalue()


def save_png(result: TraceResult, path: str | os.PathLike[str], model_name: str = "the model") -> Path:
    """Write the heatmap of `result` to `path` (a .png file); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(render_png(result, model_name))
    return out

"""The plot of ``compress compare``: perplexity against size on disk."""

from __future__ import annotations

import os
from pathlib import Path

from compress.compare.table import FLAG, Comparison
from compress.errors import CompressError


def check_plot_path(path: str | os.PathLike) -> Path:
    """The plot's file: its folder must exist and matplotlib must be installed (checked before any work)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise CompressError(f"--plot {path} is a folder; give a file name such as compare.png")
    if not target.parent.is_dir():
        raise CompressError(f"--plot {path}: the folder {target.parent} does not exist")
    if target.suffix.lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        raise CompressError(f"--plot {path}: give a .png, .svg, .pdf or .jpg file name")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CompressError("--plot needs matplotlib: pip install 'compress[plot]'") from None
    return target


def plot(comparison: Comparison, path: str | os.PathLike, title: str | None = None) -> Path:
    """Perplexity (log scale) against megabytes on disk, one point per output that has a perplexity,
    labelled with its name; one color per method, one marker per protocol (a legend names each
    protocol, and the title says so when they differ)."""
    target = check_plot_path(path)
    rows = [r for r in comparison.rows if r.perplexity is not None]
    if not rows:
        raise CompressError("nothing to plot: no output has a perplexity (measure them with --eval DATA)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r.output.method for r in rows))
    protocols = list(dict.fromkeys(r.perplexity.protocol for r in rows))
    colors = plt.get_cmap("tab10")
    markers = "osD^vP*X"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x, y = r.output.bytes_on_disk / 1e6, r.perplexity.value
        ax.scatter([x], [y], color=colors(methods.index(r.output.method) % 10), s=60,
                   marker=markers[protocols.index(r.perplexity.protocol) % len(markers)], zorder=3)
        ax.annotate(r.output.name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors(i % 10), marker="o", linestyle="", label=m) for i, m in enumerate(methods)]
    if len(protocols) > 1:
        handles += [Line2D([], [], color="gray", marker=markers[i % len(markers)], linestyle="",
                           label=f"{FLAG} ppl {p.label()}") for i, p in enumerate(protocols)]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_yscale("log")
    ax.set_xlabel("size on disk (MB, safetensors)")
    ppl_label = protocols[0].label() if len(protocols) == 1 else "protocols differ: not comparable"
    ax.set_ylabel(f"perplexity ({ppl_label})" if len(protocols) == 1 else "perplexity")
    ax.set_title(title or ("perplexity against size" if len(protocols) == 1
                           else f"perplexity against size ({FLAG} {ppl_label})"))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target.resolve()

"""The non-dominated set of a search's candidates and its plot."""

from __future__ import annotations

from pathlib import Path


def pareto_front(rows: list[dict], objectives: list[str], low: float, high: float) -> list[dict]:
    """The non-dominated rows (all objectives minimised) among those whose first cost is in [low, high],
    sorted by that cost; each with its index ``pick`` for ``compress search export --pick``."""
    inside = [r for r in rows if low - 1e-12 <= r[objectives[1]] <= high + 1e-12]
    front = []
    for r in inside:
        v = [r[k] for k in objectives]
        dominated = any(all(o[k] <= x for k, x in zip(objectives, v)) and any(o[k] < x for k, x in zip(objectives, v))
                        for o in inside)
        if not dominated and all(tuple(f["genome"]) != tuple(r["genome"]) for f in front):
            front.append(r)
    front.sort(key=lambda r: (r[objectives[1]], r[objectives[0]]))
    return [{"pick": i, **r} for i, r in enumerate(front)]


def plot_front(record: dict, path: Path, compare: list[dict] | None = None) -> None:
    """Quality against each cost: every candidate, the front, the parent and reference points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = record["objectives"]
    q, costs = objectives[0], objectives[1:]
    fig, axes = plt.subplots(1, len(costs), figsize=(5.5 * len(costs), 4.2), squeeze=False)
    for ax, cost in zip(axes[0], costs):
        ax.scatter([r[cost] for r in record["candidates"]], [r[q] for r in record["candidates"]], s=10,
                   color="0.7", label="evaluated")
        front = sorted(record["front"], key=lambda r: r[cost])
        ax.plot([r[cost] for r in front], [r[q] for r in front], "o-", color="C0", label="front")
        ax.scatter([1.0], [record["parent"][q]], marker="*", s=120, color="C3", label="parent")
        for point in compare or []:
            if cost in point and q in point:
                ax.scatter([point[cost]], [point[q]], marker="s", s=40, label=point["label"])
        for b in record["budgets"]:
            ax.axvline(b, color="0.85", lw=0.8, zorder=0)
        ax.set_xlabel(f"{cost} (fraction of the parent)")
        ax.set_ylabel(q)
        if q == "kl":
            ax.set_yscale("symlog", linthresh=1e-2)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"search front: {record['model']} ({record['config']['space']} space)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

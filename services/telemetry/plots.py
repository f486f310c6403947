"""PNG curves of a run, drawn from its metrics.jsonl at the end of the job: the training loss per
route over steps (loss.png) and every evaluation metric per route (eval.png)."""

from __future__ import annotations

from pathlib import Path

from danceopd.evaluate import HIGHER_IS_BETTER
from services.telemetry.progress import read_metrics


def _smooth(values: list[float], n: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc = (acc + [v])[-n:]
        out.append(sum(acc) / len(acc))
    return out


def write_curves(out_dir: Path) -> list[Path]:
    """plots/loss.png and (with evaluations) plots/eval.png under `out_dir`; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    out_dir = Path(out_dir)
    steps, evals = read_metrics(out_dir / "metrics.jsonl")
    folder = out_dir / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    routes = sorted({r for rec in steps for r in rec.get("route_loss", {})} | {r for rec in evals for r in rec["eval"]})
    color = {r: f"C{i % 10}" for i, r in enumerate(routes)}  # one colour per route in every panel
    written = []
    if steps:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for route in routes:
            xs = [rec["step"] for rec in steps if route in rec.get("route_loss", {})]
            ys = [rec["route_loss"][route] for rec in steps if route in rec.get("route_loss", {})]
            if xs:
                ax.plot(xs, _smooth(ys, max(1, len(ys) // 10)), label=route, color=color[route])
                ax.scatter(xs, ys, s=4, alpha=0.3, color=color[route])
        ax.set(xlabel="learner step", ylabel="training loss (points; line: running mean)", yscale="log",
               title="Training loss per route")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(folder / "loss.png")
        fig.savefig(written[-1])
        plt.close(fig)
    names = sorted({m for rec in evals for ms in rec["eval"].values() for m in ms})
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), dpi=100, squeeze=False)
        for ax, name in zip(axes[0], names):
            for route in routes:
                pts = [(rec["step"], rec["eval"][route][name]) for rec in evals if name in rec["eval"].get(route, {})]
                if pts:
                    ax.plot(*zip(*pts), marker="o", markersize=3, label=route, color=color[route])
            ax.set(xlabel="learner step", title=f"{name} ({'higher' if name in HIGHER_IS_BETTER else 'lower'} is better)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize="small")
        fig.suptitle("Evaluation per route")
        fig.tight_layout()
        written.append(folder / "eval.png")
        fig.savefig(written[-1])
        plt.close(fig)
    return written

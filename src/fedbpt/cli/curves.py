"""The run's curves as one PNG beside its summary (``W/fedbpt_curves.png``), drawn from the summary dict alone.

Three panels over the rounds: train and dev accuracy (with the no-prompt and the tuned prompt's test accuracy
marked), train loss, and the step size sigma sent to the clients. The last accuracy and loss points are the final
prompt's (round ``num_rounds``). matplotlib is imported on first use and drawn on its Agg canvas directly: no
display, no pyplot state, and ``import fedbpt.cli.curves`` costs nothing.
"""

from __future__ import annotations

import io
import math
import os

from fedbpt.core.server.summary import atomic_write
from fedbpt.flare.workspace import CURVES_FILE

__all__ = ["CURVES_FILE", "write"]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of the rows where ``key`` is a finite number (rounds without evaluation are left out)."""
    points = [(r["round"], float(r[key])) for r in rows if _finite(r.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def render(record: dict) -> bytes:
    """The PNG of a summary dict (fedbpt_summary.json's content); ValueError if it has no round to draw."""
    rounds = [r for r in record.get("rounds") or [] if isinstance(r, dict) and "round" in r]
    if not rounds:
        raise ValueError("the summary has no rounds to draw")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = record.get("metric", "acc")
    name = "accuracy" if metric == "acc" else metric
    final = record.get("final")
    rows = rounds + ([final] if isinstance(final, dict) and "round" in final else [])
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_loss, ax_sigma = fig.subplots(1, 3)

    for key, label in (("train_acc", f"train {name}"), ("dev_acc", f"dev {name}")):
        ax_acc.plot(*_series(rows, key), marker="o", label=label)
    no_prompt = (record.get("no_prompt") or {}).get("test_acc")
    if _finite(no_prompt):
        ax_acc.axhline(no_prompt, color="grey", linestyle="--", label=f"no prompt, test {100 * no_prompt:.1f}%")
    best = record.get("best") or {}
    if _finite(best.get("test_acc")) and best.get("round") is not None:
        ax_acc.plot(
            [best["round"]],
            [best["test_acc"]],
            marker="*",
            markersize=15,
            linestyle="none",
            color="C3",
            label=f"tuned prompt (best dev, round {best['round']}), test {100 * best['test_acc']:.1f}%",
        )
    ax_acc.set(xlabel="round", ylabel=name, title=f"{name} of the global prompt")
    ax_acc.legend(fontsize="small")

    ax_loss.plot(*_series(rows, "train_loss"), marker="o", color="C1")
    ax_loss.set(xlabel="round", ylabel="loss", title="train loss")

    x, sigma = _series(rounds, "sigma")
    ax_sigma.plot(x, sigma, marker="o", color="C2")
    if sigma and min(sigma) > 0 and max(sigma) / min(sigma) > 100:  # a step that grows without bound
        ax_sigma.set_yscale("log")
    ax_sigma.set(xlabel="round", ylabel="sigma", title="step size sent to the clients")
    for ax in (ax_acc, ax_loss, ax_sigma):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)

    prompt = record.get("prompt") or {}
    model = os.path.basename(str(prompt.get("model_name", "")).rstrip("/")) or "?"
    last = f"; the last point is the final prompt (round {final['round']})" if rows[-1] is final else ""
    fig.suptitle(f"FedBPT: {prompt.get('task_name', '?')}, {model}, {record.get('status', '?')}{last}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write(record: dict, path: str) -> str:
    """Draw ``record`` to ``path`` atomically (a failure leaves no file, nor a partial one); returns ``path``."""
    atomic_write(path, render(record))
    return path

"""The run record: per-round global metrics from the sites' reports, best-by-dev selection, saved prompts.

Metrics of round r are those of the global prompt the round started from (round 0 is the zero prompt, i.e. the
manual template alone); sigma and fitness are what round r's aggregation produced. Global metrics are pooled
from per-site counts (correct and scored examples; confusion matrices on the test set, or with --site_metrics
full), so no site reveals its examples or, by default, its label mix.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import TYPE_CHECKING

import numpy as np

from fedbpt.core.models.scorer import metric_from_confusion
from fedbpt.core.state import StateError, array, integer, mapping, member, optional_metric, sequence
from fedbpt.core.wire import PRIVATE_SPLITS

if TYPE_CHECKING:
    from fedbpt.core.config import RunConfig

SUMMARY_FILE = "fedbpt_summary.json"
# The logger of the lines a person follows a run by (progress, sites done, best round): job.py's console shows this
# logger's INFO records and everyone's warnings and errors, nothing else (fedbpt.flare.console)
CONSOLE_LOGGER = "fedbpt.console"


def pooled(evals: dict, split: str, metric: str) -> tuple[float | None, float | None]:
    """(metric, example-weighted loss) over all sites that reported ``split``, or (None, None). F1 needs every
    report's confusion matrix; from correct counts (a site's own data under --site_metrics pooled) the metric is
    the accuracy (:func:`split_metric`)."""
    reports = [e for e in evals.values() if f"{split}_n" in e]
    if not reports:
        return None, None
    n = sum(int(e[f"{split}_n"]) for e in reports)
    loss = sum(float(e[f"{split}_loss"]) * int(e[f"{split}_n"]) for e in reports) / max(n, 1)
    if all(f"{split}_confusion" in e for e in reports):
        conf = sum(np.asarray(e[f"{split}_confusion"], dtype=np.int64) for e in reports)
        return metric_from_confusion(conf, metric), loss
    correct = sum(
        int(e[f"{split}_correct"]) if f"{split}_correct" in e else int(np.trace(e[f"{split}_confusion"]))
        for e in reports
    )
    return (correct / n if n else float("nan")), loss


def split_metric(metric: str, split: str, site_metrics: str) -> str:
    """The metric a split's pooled value is: the task's, except F1 on the sites' own train/dev data, which they
    report as correct counts by default (--site_metrics pooled): accuracy there."""
    if metric == "f1" and split in PRIVATE_SPLITS and site_metrics == "pooled":
        return "acc"
    return metric


def atomic_write(path: str, data: bytes) -> None:
    """Write then rename: a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


class RunSummary:
    def __init__(self, config: RunConfig, metric: str) -> None:
        self.config = config
        self.metric = metric
        self.rounds: list[dict] = []
        self.best: dict = {"round": None, "dev_acc": None, "dev_loss": None, "test_acc": None}
        self.best_z: np.ndarray | None = None
        self.final: dict | None = None
        self.no_prompt: dict | None = None  # the template alone on the test set: what tuning is measured against
        self.final_z: np.ndarray | None = None
        self.status = "running"
        self.reason: str | None = None

    def _metrics(self, evals: dict) -> dict:
        row = {}
        for split in ("train", "dev", "test"):
            value, loss = pooled(evals, split, self.metric)
            row[f"{split}_acc"] = value
            if split in ("train", "dev"):
                row[f"{split}_loss"] = loss
        return row

    def _consider_best(self, row: dict, z: np.ndarray) -> None:
        """Best by dev metric; at an equal metric the lower dev loss wins (a dev set of a few dozen examples
        ties often, and the earliest of a tie is usually the untrained start), then the earlier round."""
        dev = row.get("dev_acc")
        if dev is None or not np.isfinite(dev):  # no dev example scored: nothing to rank by
            return
        loss = row.get("dev_loss")
        loss = np.inf if loss is None else loss
        best, best_loss = self.best["dev_acc"], self.best.get("dev_loss")
        best_loss = np.inf if best_loss is None else best_loss
        if best is None or dev > best or (dev == best and loss < best_loss):
            self.best = {
                "round": row["round"],
                "dev_acc": dev,
                "dev_loss": row.get("dev_loss"),
                "test_acc": row.get("test_acc"),
            }
            self.best_z = np.array(z, dtype=np.float64)

    def add_round(self, rnd: int, z: np.ndarray, evals: dict, clients: list[str], **fields) -> dict:
        row = {"round": rnd, "clients": clients, **self._metrics(evals), **fields}
        self.rounds.append(row)
        self._consider_best(row, z)
        return row

    def add_final(self, rnd: int, z: np.ndarray, evals: dict) -> dict:
        row = {"round": rnd, **self._metrics(evals)}
        best_test, _ = pooled(evals, "best_test", self.metric)  # --test_eval end: the best-dev prompt's test score
        if best_test is not None and self.best["round"] is not None:
            self.best["test_acc"] = best_test
        no_prompt, _ = pooled(evals, "no_prompt_test", self.metric)
        if no_prompt is not None:
            n = sum(int(e["no_prompt_test_n"]) for e in evals.values() if "no_prompt_test_n" in e)
            self.no_prompt = {"test_acc": no_prompt, "test_n": n}
        self.final = row
        self.final_z = np.array(z, dtype=np.float64)
        self._consider_best(row, z)
        # train: every site reports it; test: only eval clients, so absent is allowed, empty is not
        empty = [k for k in ("train_acc", "test_acc") if _empty(row.get(k), required=k == "train_acc")]
        if empty:
            self.fail(
                f"no example was scored for {', '.join(k[:-4] for k in empty)}: every one was dropped (too "
                "long for the model with the prompt) or no site reported it; see the sites' logs"
            )
        else:
            self.status = "completed"
        return row

    def state_dict(self) -> dict:
        """What a resumed run needs of the record: the rounds so far and the best-by-dev choice under ``summary``, the
        best prompt as the array ``best_z``. The final evaluation is not part of it: a resumed run makes its own."""
        state = {"summary": {"rounds": [dict(r) for r in self.rounds], "best": dict(self.best)}}
        if self.best_z is not None:
            state["best_z"] = np.array(self.best_z, dtype=np.float64)
        return state

    @staticmethod
    def check_state(state: dict, d: int) -> None:
        """Raise StateError for the first field of ``state`` a record of ``d``-dimensional prompts could not continue:
        rows that are not rounds 0, 1, ... in order, a best round or metric that does not fit them."""
        summary = mapping(member(state, "summary"), "summary")
        rows = sequence(member(summary, "rounds", "summary.rounds"), "summary.rounds")
        for i, row in enumerate(rows):
            field = f"summary.rounds[{i}]"
            v = member(mapping(row, field), "round", f"{field}.round")
            if isinstance(v, bool) or not isinstance(v, int) or v != i:
                raise StateError(f"{field}.round", f"is {v!r}, not {i}: the rows are rounds 0, 1, ... in order")
        best = mapping(member(summary, "best", "summary.best"), "summary.best")
        best_round = member(best, "round", "summary.best.round")
        dev = optional_metric(member(best, "dev_acc", "summary.best.dev_acc"), "summary.best.dev_acc")
        for key in ("dev_loss", "test_acc"):  # absent reads as null
            optional_metric(best.get(key), f"summary.best.{key}")
        if best_round is None:
            if dev is not None:
                raise StateError("summary.best.round", "is null, yet summary.best.dev_acc is set")
            if "best_z" in state:
                raise StateError("best_z", "is present, yet summary.best.round is null")
        else:
            if not rows:
                raise StateError("summary.best.round", f"is {best_round!r}, but no round is done")
            integer(best_round, "summary.best.round", 0, len(rows) - 1)
            array(state, "best_z", (d,))

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s output; every field is checked before the record changes."""
        self.check_state(state, self.config.intrinsic_dim)
        self.rounds = [dict(r) for r in state["summary"]["rounds"]]
        self.best = dict(state["summary"]["best"])
        self.best_z = np.array(state["best_z"], dtype=np.float64) if "best_z" in state else None

    def split_metric(self, split: str) -> str:
        """What the pooled value of ``split`` is (see :func:`split_metric`)."""
        return split_metric(self.metric, split, self.config.site_metrics)

    def fail(self, reason: str) -> None:
        self.status, self.reason = "failed", reason

    def progress_line(self, row: dict) -> str:
        """One round (or the final evaluation) on one line, every number rounded for reading."""
        f = _rounded

        total = self.config.num_rounds
        head = f"round {row['round']}/{total}" if row["round"] < total else f"final ({total} rounds)"
        parts = [
            head,
            f"train {self.split_metric('train')} {f(row.get('train_acc'))} loss {f(row.get('train_loss'))}",
            f"dev {f(row.get('dev_acc'))}" + ("" if self.split_metric("dev") == self.metric else " (acc)"),
            f"test {f(row.get('test_acc'))}",
        ]
        if "sigma" in row:
            parts += [
                f"clients {len(row['clients'])}",
                f"fitness best {f(row['best_fitness'])} median {f(row['median_fitness'])}",
                f"sigma {f(row['sigma'])}",
                f"{row['seconds']:.2f}s",
            ]
            if row.get("restored_to") is not None:  # robust FedBPT: this round's mean lost to the incumbent
                parts.insert(-1, f"back to round {row['restored_to']}'s prompt")
        if "totals" in row:  # the final line: what the whole run cost
            t = row["totals"]
            parts.append(f"queries {t['queries']:,} search + {t['eval_queries']:,} eval, tokens {t['tokens']:,}")
        return " | ".join(parts)

    def best_line(self) -> str:
        """The prompt chosen by dev, rounded as the progress lines are."""
        best = self.best
        return (
            f"best round by dev {self.split_metric('dev')}: {'-' if best['round'] is None else best['round']} "
            f"(dev {_rounded(best['dev_acc'])}, test {_rounded(best['test_acc'])})"
        )

    def to_dict(self) -> dict:
        meta = {
            k: getattr(self.config, k)
            for k in ("model_name", "task_name", "seed", "intrinsic_dim", "n_prompt_tokens", "cat_or_add", "sigma")
        }
        meta["prompt_placement"] = self.config.placement
        out = {
            "status": self.status,
            "metric": self.metric,
            "split_metrics": {s: self.split_metric(s) for s in ("train", "dev", "test")},
            "config": self.config.model_dump(),
            "rounds": self.rounds,
            "best": dict(self.best),
            "final": self.final,
            "prompt": meta,
        }
        if self.no_prompt is not None:
            out["no_prompt"] = dict(self.no_prompt)
        if self.reason:
            out["reason"] = self.reason
        if self.best_z is not None:
            out["best"]["z"] = "prompt_best.npy"
        if self.final is not None:
            out["final"] = dict(self.final, z="prompt_final.npy")
        return out

    def write(self, out_dir: str) -> str:
        """Write the prompts, then the summary (each atomically); paths in the summary are relative to it."""
        os.makedirs(out_dir, exist_ok=True)
        for name, z in (("prompt_best.npy", self.best_z), ("prompt_final.npy", self.final_z)):
            if z is not None:
                atomic_write(os.path.join(out_dir, name), npy_bytes(z))
        path = os.path.join(out_dir, SUMMARY_FILE)
        atomic_write(path, strict_json(self.to_dict()).encode())
        return path


def verdict(record: dict) -> str | None:
    """One line comparing the best-dev prompt with no prompt on the test set (a summary dict), or None without both."""
    no_prompt, best = record.get("no_prompt"), record.get("best") or {}
    if not no_prompt or no_prompt.get("test_acc") is None or best.get("test_acc") is None:
        return None
    name = "accuracy" if record.get("metric") == "acc" else record.get("metric")
    before, after = 100 * no_prompt["test_acc"], 100 * best["test_acc"]
    return (
        f"test {name}: no prompt {before:.1f}% -> tuned prompt {after:.1f}% ({after - before:+.1f} points, "
        f"{no_prompt['test_n']} examples; the best-dev prompt, round {best['round']})"
    )


def _rounded(value, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def _empty(value, required: bool) -> bool:
    return (value is None and required) or (value is not None and not np.isfinite(value))


def _finite(o):
    """NaN and infinities become null: JSON has no such numbers, and a strict reader refuses them."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return o


def strict_json(record: dict) -> str:
    """Indented JSON that any strict parser reads (no NaN, no Infinity)."""
    return json.dumps(_finite(record), indent=2, allow_nan=False, default=_json_default)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

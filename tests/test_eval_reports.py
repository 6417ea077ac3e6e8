"""Evaluation reports in client uploads: malformed ones are rejected before they reach the pooled metrics."""

from __future__ import annotations

import logging

import helpers
import numpy as np
import pytest
from conftest import valid_upload

from fedbpt.core.algorithm.search import evaluate
from fedbpt.core.models.scorer import Encoded
from fedbpt.core.server.federation import Federation
from fedbpt.core.wire import decode_eval
from fedbpt.errors import PayloadError, TooFewClients

D, ITERS = 8, 4
SITES = ["site-1", "site-2", "site-3"]
# hand-made train reports of the two honest sites: 7/8 and 5/8 correct -> pooled 12/16 = 0.75, loss 0.4
CONF1, CONF2 = np.array([[3, 1], [0, 4]]), np.array([[2, 2], [1, 3]])


def make_cfg(**kw) -> dict:
    return helpers.make_cfg(dict(intrinsic_dim=D, local_iter=ITERS, num_clients=3, min_clients=2, num_rounds=3), **kw)


def report(conf=CONF1, loss=0.2, split="train", **extra) -> dict:
    return {f"{split}_loss": loss, f"{split}_n": int(np.sum(conf)), f"{split}_confusion": np.asarray(conf), **extra}


def upload(site: str, state_mean: np.ndarray, evals: dict) -> dict:
    """A valid search result plus ``evals``: only the evaluation part can be wrong."""
    return valid_upload(site, state_mean, D, ITERS, seconds_search=1.0, seconds_eval=0.5, **evals)


def bad_report(kind: str) -> dict:
    r = report()
    if kind == "wrong_shape":
        r["train_confusion"] = np.eye(3, dtype=np.int64) * 2 + np.array([[2, 0, 0], [0, 0, 0], [0, 0, 0]])
    elif kind == "float_confusion":
        r["train_confusion"] = CONF1.astype(np.float64)
    elif kind == "bool_confusion":
        r["train_confusion"], r["train_n"] = np.eye(2, dtype=bool), 2
    elif kind == "list_confusion":
        r["train_confusion"] = CONF1.tolist()
    elif kind == "negative_count":
        r["train_confusion"] = np.array([[4, -1], [0, 5]])  # still sums to train_n = 8
    elif kind == "sum_not_n":
        r["train_n"] = 9
    elif kind == "wrapping_sum":  # uint64 entries whose machine sum wraps around to train_n
        r["train_confusion"] = np.array([[2**63, 2**63], [0, 8]], dtype=np.uint64)
    elif kind == "negative_n":
        r["train_confusion"], r["train_n"] = np.zeros((2, 2), dtype=np.int64), -1
    elif kind == "float_n":
        r["train_n"] = 8.0
    elif kind == "bool_n":
        r["train_confusion"], r["train_n"] = np.array([[1, 0], [0, 0]]), True
    elif kind == "nan_loss":
        r["train_loss"] = float("nan")
    elif kind == "inf_loss":
        r["train_loss"] = np.inf
    elif kind == "negative_loss":
        r["train_loss"] = -0.1
    elif kind == "str_loss":
        r["train_loss"] = "0.2"
    elif kind.startswith("missing_"):
        del r[kind.removeprefix("missing_")]
    return r


KINDS = {
    "wrong_shape": r"'train_confusion' must have shape \(2, 2\), got \(3, 3\)",
    "float_confusion": "'train_confusion' must be an integer array",
    "bool_confusion": "'train_confusion' must be an integer array",
    "list_confusion": "'train_confusion' must be an integer array",
    "negative_count": "'train_confusion' has negative counts",
    "sum_not_n": "'train_confusion' counts 8 predictions but 'train_n' is 9",
    "wrapping_sum": "'train_confusion' counts 18446744073709551624 predictions but 'train_n' is 8",
    "negative_n": "'train_n' must be an integer",
    "float_n": "'train_n' must be an integer",
    "bool_n": "'train_n' must be an integer",
    "nan_loss": "'train_loss' is not a finite number",
    "inf_loss": "'train_loss' is not a finite number",
    "negative_loss": r"'train_loss' -0.1 is outside \[0.0, inf\] for --loss_type ce",
    "str_loss": "'train_loss' is not a finite number",
    "missing_train_n": "'train_loss' came without 'train_n'",
    "missing_train_loss": "'train_n' came without 'train_loss'",
    "missing_train_confusion": "'train_loss' came without 'train_confusion'",
}


@pytest.mark.parametrize("kind", KINDS)
def test_each_malformed_report_is_rejected_naming_the_field(kind):
    with pytest.raises(PayloadError, match=KINDS[kind]):
        decode_eval(bad_report(kind), 2)


def test_every_split_is_checked_and_a_payload_must_be_a_dict():
    with pytest.raises(PayloadError, match="'test_confusion' must have shape"):
        decode_eval({**report(), **report(np.ones((3, 3), dtype=np.int64), split="test")}, 2)
    dev = report(split="dev")
    del dev["dev_confusion"]
    with pytest.raises(PayloadError, match="'dev_loss' came without 'dev_confusion'"):
        decode_eval({**report(), **dev}, 2)
    with pytest.raises(PayloadError, match="not a dict"):
        decode_eval([report()], 2)


def test_perf_loss_is_minus_accuracy_so_only_minus_one_to_zero_passes():
    assert decode_eval(report(loss=-0.875), 2, "perf")["train_loss"] == -0.875
    for loss in (0.5, -1.5):
        with pytest.raises(PayloadError, match="'train_loss' .* outside \\[-1.0, 0.0\\] for --loss_type perf"):
            decode_eval(report(loss=loss), 2, "perf")
    with pytest.raises(PayloadError, match="outside"):
        decode_eval(report(loss=-0.875), 2, "ce")


def test_clean_report_keeps_only_the_eval_fields_and_accepts_numpy_scalars():
    msg = upload("site-1", np.zeros(D), report(CONF1.astype(np.int32), np.float32(0.25)))
    msg.update(report(CONF2, 0, split="dev"))
    msg["dev_n"] = np.int64(msg["dev_n"])  # what FOBS delivers for a numpy integer (checked in the next test)
    out = decode_eval(msg, 2)
    assert set(out) == {"train_loss", "train_n", "train_confusion", "dev_loss", "dev_n", "dev_confusion"}
    assert out["train_n"] == 8 and out["dev_n"] == 8 and out["train_loss"] == 0.25 and out["dev_loss"] == 0.0
    assert out["train_confusion"].dtype == np.int64 and np.array_equal(out["train_confusion"], CONF1)
    assert decode_eval({"mean": np.zeros(D)}, 2) == {}  # no split reported (e.g. the setup answer)
    assert decode_eval(report(np.zeros((4, 4), dtype=np.int64)), 4)["train_n"] == 0  # empty shard


@pytest.mark.parametrize("loss_type", ["ce", "hinge", "perf"])
def test_what_the_client_computes_passes_after_nvflare_serialisation(loss_type, nvflare_fobs):
    """search.evaluate of one prompt and of three (local-only), sent through FOBS, is accepted unchanged."""
    from nvflare.apis.dxo import DXO, DataKind, from_shareable

    fobs = nvflare_fobs
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=10)
    enc = Encoded([np.zeros(2, dtype=np.int64)] * 10, [np.ones(2, dtype=bool)] * 10, np.ones(10, int), labels)

    def logits_fn(z, _enc):
        return rng.normal(size=(len(z), 10, 3)) * 3

    msg = {}
    for split, z in (("train", np.zeros(D)), ("dev", np.zeros((3, D)))):
        r = evaluate(logits_fn, z, enc, loss_type)
        msg.update({f"{split}_loss": r["loss"], f"{split}_n": np.int64(r["n"]), f"{split}_confusion": r["confusion"]})
    back = from_shareable(fobs.loads(fobs.dumps(DXO(data_kind=DataKind.COLLECTION, data=msg).to_shareable()))).data
    out = decode_eval(back, 3, loss_type)
    assert out["train_n"] == 10 and out["dev_n"] == 30
    assert out["dev_loss"] == msg["dev_loss"] and np.array_equal(out["dev_confusion"], msg["dev_confusion"])


@pytest.mark.parametrize("kind", ["wrong_shape", "nan_loss", "sum_not_n"])
def test_round_with_a_hostile_report_completes_with_the_honest_sites(kind, caplog):
    cfg = make_cfg()
    fed, without = Federation(cfg, SITES), Federation(cfg, SITES)
    targets, _ = fed.start_round(0)
    without.start_round(0)
    mean0 = fed._state.mean
    ok = {"site-1": upload("site-1", mean0, report(CONF1, 0.2)), "site-2": upload("site-2", mean0, report(CONF2, 0.6))}
    with caplog.at_level(logging.WARNING, logger="fedbpt.core.server.federation"):
        row = fed.finish_round(0, targets, {**ok, "site-3": upload("site-3", mean0, bad_report(kind))})
    ref = without.finish_round(0, targets, dict(ok))

    rejected = [r for r in caplog.records if "rejected the update of site-3" in r.getMessage()]
    assert len(rejected) == 1 and rejected[0].levelno == logging.ERROR and "'train_" in rejected[0].getMessage()
    assert row["clients"] == ["site-1", "site-2"] and row["missing"] == ["site-3"]
    assert row["train_acc"] == pytest.approx(0.75) and row["train_loss"] == pytest.approx(0.4)
    assert row["client_seconds"] == {"site-1": 1.5, "site-2": 1.5}
    assert np.array_equal(fed.server.state(1).mean, without.server.state(1).mean)  # as if site-3 never answered
    assert row["sigma"] == ref["sigma"]


def test_a_hostile_report_counts_against_min_clients():
    fed = Federation(make_cfg(), SITES)  # min_clients 2
    targets, _ = fed.start_round(0)
    mean0 = fed._state.mean
    results = {"site-1": upload("site-1", mean0, report()), "site-2": upload("site-2", mean0, bad_report("nan_loss"))}
    with pytest.raises(TooFewClients, match="1 usable updates"):
        fed.finish_round(0, targets, results)
    assert fed.summary.status == "failed" and "site-2" in fed.summary.reason


@pytest.mark.parametrize("key", ["seconds_eval", "setup_seconds", "import_seconds"])
@pytest.mark.parametrize("value", [-5.0, float("nan"), "1.0", True])
def test_a_bad_timing_rejects_the_upload(key, value):
    fed = Federation(make_cfg(min_clients=1), SITES)
    targets, _ = fed.start_round(0)
    bad = upload("site-1", fed._state.mean, report())
    bad[key] = value
    row = fed.finish_round(0, targets, {"site-1": bad, "site-2": upload("site-2", fed._state.mean, report())})
    assert row["clients"] == ["site-2"]


def test_setup_and_import_seconds_reach_the_round_row():
    """Per site, beside client_seconds; a site that sends none (it reused its runtime, or an older client) has 0."""
    fed = Federation(make_cfg(), SITES)
    targets, _ = fed.start_round(0)
    results = {s: upload(s, fed._state.mean, report()) for s in targets}
    results["site-1"].update(setup_seconds=2.5, import_seconds=4)
    results["site-2"].update(setup_seconds=0.0, import_seconds=0.0)
    row = fed.finish_round(0, targets, results)
    assert row["setup_seconds"] == {"site-1": 2.5, "site-2": 0.0, "site-3": 0.0}
    assert row["import_seconds"] == {"site-1": 4.0, "site-2": 0.0, "site-3": 0.0}
    assert row["client_seconds"] == {"site-1": 1.5, "site-2": 1.5, "site-3": 1.5}  # set-up is not model work


def test_final_evaluation_drops_a_bad_report(caplog):
    fed = Federation(make_cfg(), SITES)
    fed.final_message()
    results = {
        "site-1": {**report(CONF1, 0.2), **report(CONF1, 0.1, split="dev")},
        "site-2": {**report(CONF2, 0.6), **report(CONF2, 0.3, split="dev")},
        "site-3": {**bad_report("wrong_shape"), **report(CONF1, 0.1, split="dev")},
    }
    with caplog.at_level(logging.ERROR, logger="fedbpt.core.server.federation"):
        row = fed.finish(results)
    dropped = [r for r in caplog.records if "dropped the report of site-3" in r.getMessage()]
    assert len(dropped) == 1 and "'train_confusion'" in dropped[0].getMessage()
    assert row["train_acc"] == pytest.approx(0.75) and row["train_loss"] == pytest.approx(0.4)
    assert row["dev_acc"] == pytest.approx(0.75)  # site-3's valid dev part goes too: the whole report is dropped
    assert fed.summary.status == "completed" and fed.summary.final is row


def test_best_prompt_is_the_highest_dev_accuracy_then_the_lowest_dev_loss():
    """Small dev sets tie often: a tie goes to the lower dev loss, a full tie to the earlier round."""
    from fedbpt.core.server.summary import RunSummary

    s = RunSummary({}, "acc")
    good, tie_worse, tie_better, worse = CONF1, CONF1, CONF1, CONF2  # dev acc 7/8, 7/8, 7/8, 5/8
    for rnd, conf, loss in ((0, worse, 0.1), (1, good, 0.5), (2, tie_worse, 0.6), (3, tie_better, 0.3)):
        s.add_round(rnd, np.full(D, float(rnd)), {"site-1": report(conf, loss, "dev")}, ["site-1"])
    assert s.best["round"] == 3 and s.best["dev_acc"] == 0.875 and s.best["dev_loss"] == 0.3
    s.add_round(4, np.full(D, 4.0), {"site-1": report(CONF1, 0.3, "dev")}, ["site-1"])  # full tie: keep round 3
    assert s.best["round"] == 3 and np.array_equal(s.best_z, np.full(D, 3.0))

"""Hostile or broken client uploads: each is rejected, logged and excluded; the global state is as if it never came."""

from __future__ import annotations

import logging

import helpers
import numpy as np
import pytest
from conftest import valid_upload

from fedbpt.core.server.federation import Federation
from fedbpt.core.wire import decode_update
from fedbpt.errors import PayloadError, TooFewClients

D, ITERS = 8, 4
SITES = ["site-1", "site-2", "site-3"]


def make_cfg(**kw) -> dict:
    return helpers.make_cfg(dict(intrinsic_dim=D, local_iter=ITERS, num_clients=3, min_clients=2, num_rounds=3), **kw)


def good(site: str, state_mean: np.ndarray) -> dict:
    return valid_upload(site, state_mean, D, ITERS)


def es_snapshot(fed: Federation) -> tuple:
    es = fed.server.es
    return (es.mean.copy(), float(es.sigma), es.sm.C.copy(), es.countiter, fed.server.sent_sigma)


def assert_same_state(a: tuple, b: tuple) -> None:
    assert np.array_equal(a[0], b[0])
    assert a[1] == b[1]
    assert np.array_equal(a[2], b[2])
    assert a[3:] == b[3:]


def broken(kind: str, payload: dict) -> dict:
    p = dict(payload)
    if kind == "short_mean":
        p["mean"] = p["mean"][:-1]
    elif kind == "matrix_mean":
        p["mean"] = p["mean"][:, None]
    elif kind == "huge_mean":
        p["mean"] = np.tile(p["mean"], 1000)
    elif kind == "nan_mean":
        p["mean"] = p["mean"].copy()
        p["mean"][3] = np.nan
    elif kind == "inf_mean":
        p["mean"] = p["mean"].copy()
        p["mean"][0] = np.inf
    elif kind == "outside_box":
        p["mean"] = np.full(D, 2.5)
    elif kind == "int_mean":
        p["mean"] = np.zeros(D, dtype=np.int64)
    elif kind.startswith("missing_"):
        del p[kind.removeprefix("missing_")]
    elif kind == "nan_fitness":
        p["fitness"] = float("nan")
    elif kind == "inf_fitness":
        p["fitness"] = float("-inf")
    elif kind == "str_fitness":
        p["fitness"] = "0.1"
    elif kind == "none_fitness":
        p["fitness"] = None
    elif kind == "bool_fitness":
        p["fitness"] = True
    elif kind == "bad_sigmas":
        p["sigmas"] = np.full(ITERS + 3, 0.5)
    elif kind == "negative_sigmas":
        p["sigmas"] = -np.ones(ITERS)
    elif kind == "not_a_dict":
        return [p["mean"]]
    return p


KINDS = [
    "short_mean",
    "matrix_mean",
    "huge_mean",
    "nan_mean",
    "inf_mean",
    "int_mean",
    "outside_box",
    "missing_mean",
    "missing_fitness",
    "missing_sigmas",
    "missing_popsize",
    "nan_fitness",
    "inf_fitness",
    "str_fitness",
    "none_fitness",
    "bool_fitness",
    "bad_sigmas",
    "negative_sigmas",
    "not_a_dict",
]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_payload_is_rejected_logged_and_leaves_no_trace(kind, caplog):
    """Round with good site-1, site-2 and a broken site-3 == the same round where site-3 never answered."""
    cfg = make_cfg(bound=2.0 if kind == "outside_box" else 0.0)
    with_bad, without = Federation(cfg, SITES), Federation(cfg, SITES)
    targets, _ = with_bad.start_round(0)
    without.start_round(0)
    assert targets == SITES
    before = es_snapshot(with_bad)
    mean0 = with_bad._state.mean
    ok = {s: good(s, mean0) for s in ("site-1", "site-2")}
    with caplog.at_level(logging.WARNING, logger="fedbpt.core.server.federation"):
        row = with_bad.finish_round(0, targets, {**ok, "site-3": broken(kind, good("site-3", mean0))})
    without.finish_round(0, targets, dict(ok))

    rejected = [r for r in caplog.records if "rejected the update of site-3" in r.getMessage()]
    assert len(rejected) == 1 and rejected[0].levelno == logging.ERROR
    assert row["clients"] == ["site-1", "site-2"] and row["missing"] == ["site-3"]
    assert_same_state(es_snapshot(with_bad), es_snapshot(without))
    assert not np.array_equal(es_snapshot(with_bad)[0], before[0])  # the good updates did move the mean


@pytest.mark.parametrize("kind", ["huge_mean", "nan_fitness", "missing_mean"])
def test_bad_payload_below_min_clients_stops_without_touching_the_state(kind):
    cfg = make_cfg()  # min_clients 2
    fed = Federation(cfg, SITES)
    targets, _ = fed.start_round(0)
    before = es_snapshot(fed)
    mean0 = fed._state.mean
    results = {"site-1": good("site-1", mean0), "site-2": broken(kind, good("site-2", mean0))}
    with pytest.raises(TooFewClients, match=r"round 0: 1 usable updates, fewer than --min_clients 2 \(missing: "):
        fed.finish_round(0, targets, results)
    assert_same_state(es_snapshot(fed), before)
    assert fed.summary.status == "failed" and "site-2" in fed.summary.reason and "site-3" in fed.summary.reason


@pytest.mark.parametrize(
    "kind, message",
    [
        ("huge_mean", f"shape \\({D},\\), got \\({1000 * D},\\)"),
        ("nan_mean", "NaN or inf"),
        ("missing_fitness", "missing key 'fitness'"),
        ("str_fitness", "'fitness' is not a finite number"),
        ("inf_fitness", "'fitness' is not a finite number"),
    ],
)
def test_rejection_names_what_is_wrong(kind, message):
    with pytest.raises(PayloadError, match=message):
        decode_update("site-3", broken(kind, good("site-3", np.zeros(D))), D, ITERS)

"""The robust FedBPT (--aggregation fedbpt_robust): each rule against hand-checked numbers, the per-client record
of what the server did, and the collapse under label skew that the faithful rules show and the robust ones fix."""

from __future__ import annotations

import numpy as np
import pytest

from fedbpt.core.algorithm.aggregation import (
    ClientUpdate,
    RobustServerES,
    ServerES,
    improves_on,
    mahalanobis_clip_threshold,
    median_local_step,
    pooled_loss,
    rank_weights,
    shard_weights,
    weighted_told_points,
)
from fedbpt.core.algorithm.baselines import make_server
from fedbpt.core.config import RunConfig

D = 10


def _update(
    site: str, mean, fitness: float, sigma_final: float = 0.7, n_train: int = 8, start_loss: float | None = None
) -> ClientUpdate:
    mean = np.asarray(mean, dtype=np.float64)
    return ClientUpdate(site, mean, fitness, np.ones(8), 5, n_train, sigma_final, start_loss)


def _unit(i: int) -> np.ndarray:
    e = np.zeros(D)
    e[i] = 1.0
    return e


def test_rank_weights_follow_the_fitness_order():
    # fitnesses 0.3, 0.1, 0.2 rank 3rd, 1st, 2nd: weights (best first) 0.6, 0.3, 0.1 land as 0.1, 0.6, 0.3
    assert rank_weights(np.array([0.3, 0.1, 0.2]), [0.6, 0.3, 0.1]).tolist() == [0.1, 0.6, 0.3]
    # ranks past pycma's mu get no weight; ties keep upload order
    assert rank_weights(np.array([0.5, 0.5, 0.9]), [0.75, 0.25]).tolist() == [0.75, 0.25, 0.0]


def test_median_local_step_hand_checked():
    ups = [_update("a", np.zeros(D), 0.1, 0.3), _update("b", np.zeros(D), 0.2, 0.9), _update("c", np.zeros(D), 0, 0.5)]
    assert median_local_step(ups) == 0.5
    assert median_local_step(ups[:2]) == pytest.approx(0.6)  # even count: the mean of the middle two


def test_shard_weights_and_told_points_hand_checked():
    ups = [_update("a", np.zeros(D), 0.1, n_train=2), _update("b", np.zeros(D), 0.2, n_train=6)]
    assert shard_weights(ups).tolist() == [0.25, 0.75]
    # a CMA-ES with weights 1/2, 1/2 told m + 2 * 0.25 * (x1 - m) and m + 2 * 0.75 * (x2 - m) moves to
    # m + 0.25 (x1 - m) + 0.75 (x2 - m): from m = (1, 1) to x1 = (3, 1) and x2 = (1, 5), the told points are
    # (2, 1) and (1, 7), their average (1.5, 4) = (1, 1) + 0.25 (2, 0) + 0.75 (0, 4)
    told = weighted_told_points(
        np.array([1.0, 1.0]), [np.array([3.0, 1.0]), np.array([1.0, 5.0])], np.array([0.25, 0.75]), 2
    )
    assert [t.tolist() for t in told] == [[2.0, 1.0], [1.0, 7.0]]
    assert np.mean(told, axis=0).tolist() == [1.5, 4.0]


def test_robust_server_takes_the_shard_weighted_average_of_the_client_means():
    """Three clients with 2, 3 and 5 examples move one unit along e0, e1, e2 from z = 0: the robust mean is
    (0.2, 0.3, 0.5, 0, ...) whatever their fitnesses; the faithful server puts the largest weight on the
    best-ranked client (e0 here)."""
    ups = [
        _update("site-1", _unit(0), 0.01, n_train=2),
        _update("site-2", _unit(1), 0.5, n_train=3),
        _update("site-3", _unit(2), 0.9, n_train=5),
    ]
    robust, faithful = RobustServerES(D, 1.0, 3, seed=1), ServerES(D, 1.0, 3, seed=1)
    info = robust.aggregate(ups)
    faithful.aggregate(ups)
    expected = np.zeros(D)
    expected[:3] = [0.2, 0.3, 0.5]
    assert np.allclose(robust.state(1).mean, expected, atol=1e-12)
    assert [info.clients[s]["weight"] for s in ("site-1", "site-2", "site-3")] == pytest.approx([0.2, 0.3, 0.5])
    m = faithful.state(1).mean
    assert m[0] > m[1] > m[2] > 0 and m[3:] == pytest.approx(0.0)


def test_robust_server_clips_each_move_as_the_faithful_server_does_then_weighs_it():
    """A move of 100 along e0 lies far beyond pycma's Mahalanobis limit. Both servers keep the same share of it;
    the robust one then averages the clipped moves by shard size. Two clients, every local step 1: Eq. 6 gives
    2 sqrt(8 / (2 x 5)) = 1.78885 before the tell; the limit at d = 10 is sqrt(10) + 20/12 = 4.82894; the far move
    is 100 / 1.78885 = 55.9017 Mahalanobis units, so 0.0863826 of it is kept: 8.63826 along e0. Equal shards:
    the new mean is (4.31913, 0.25, 0, ...)."""
    ups = [_update("site-1", 100.0 * _unit(0), 0.2), _update("site-2", 0.5 * _unit(1), 0.1)]
    robust, faithful = RobustServerES(D, 1.0, 2, seed=1), ServerES(D, 1.0, 2, seed=1)
    info, finfo = robust.aggregate(ups), faithful.aggregate(ups)
    assert info.sigma_before_tell == pytest.approx(1.78885, abs=1e-5)
    assert info.clipped == finfo.clipped == 1
    assert info.clients["site-1"]["kept"] == finfo.clients["site-1"]["kept"] == pytest.approx(0.0863826, rel=1e-5)
    assert info.clients["site-2"]["kept"] == 1.0
    assert np.allclose(robust.state(1).mean[:3], [4.31913, 0.25, 0.0], atol=1e-5)
    assert np.allclose(robust.state(1).mean[3:], 0.0)


def test_robust_server_sends_the_median_final_local_step_and_keeps_eq6_before_tell():
    rng = np.random.default_rng(4)
    server = RobustServerES(D, 1.0, 3, seed=1)
    for rnd, finals in enumerate(([0.8, 0.6, 0.7], [0.2, 0.5, 0.4])):
        ups = [_update(f"site-{i + 1}", rng.normal(size=D) * 0.3, float(rng.random()), f) for i, f in enumerate(finals)]
        info = server.aggregate(ups)
        # Eq. 6 with every local step 1: S' = the best floor(3/2) = 1 client, 2 * sqrt(8 * 1^2 / (3 * 5)) = 1.46059
        assert info.sigma_before_tell == pytest.approx(2 * np.sqrt(8 / 15)) == pytest.approx(1.46059, abs=1e-5)
        assert info.sigma_sent == float(np.median(finals)) == server.state(rnd + 1).sigma
    assert server.sent_sigma == 0.4


def test_client_stats_record_weight_distance_and_clipping():
    """A far client mean is clipped by pycma: ``kept`` is the share of its move the server kept, limit / distance."""
    server = ServerES(D, 1.0, 2, seed=1)
    far, near = 100.0 * _unit(0), 0.5 * _unit(1)
    info = server.aggregate([_update("site-1", far, 0.2), _update("site-2", near, 0.1)])
    st = info.clients
    assert st["site-1"]["moved"] == pytest.approx(100.0) and st["site-2"]["moved"] == pytest.approx(0.5)
    assert st["site-2"]["weight"] > st["site-1"]["weight"] > 0 and st["site-1"]["weight"] + st["site-2"][
        "weight"
    ] == pytest.approx(1.0)
    before = info.sigma_before_tell  # identity covariance at the start: Mahalanobis distance = |move| / sigma
    limit = mahalanobis_clip_threshold(D)
    assert st["site-1"]["kept"] == pytest.approx(limit / (100.0 / before))
    assert st["site-2"]["kept"] == 1.0 and info.clipped == 1
    assert st["site-1"]["sigma_final"] == 0.7 and st["site-1"]["fitness"] == 0.2


def test_fedbpt_robust_is_chosen_by_the_aggregation_option():
    cfg = RunConfig.build(aggregation="fedbpt_robust", intrinsic_dim=D)
    assert type(make_server(cfg.aggregation, D, 1.0, 3, ["site-1", "site-2", "site-3"])) is RobustServerES
    assert type(make_server("fedbpt", D, 1.0, 3, ["site-1"])) is ServerES


def test_a_missing_client_is_told_as_the_mean_for_the_robust_server_too():
    """Two of three clients answer, with 1 and 3 examples: the mean moves to the answers' shard-weighted average,
    (0.25, 0.75, 0, ...); the padded current mean adds nothing."""
    server = RobustServerES(D, 1.0, 3, seed=1)
    info = server.aggregate([_update("site-1", _unit(0), 0.1, n_train=1), _update("site-2", _unit(1), 0.2, n_train=3)])
    expected = np.zeros(D)
    expected[:2] = [0.25, 0.75]
    assert np.allclose(server.state(1).mean, expected, atol=1e-12)
    assert set(info.clients) == {"site-1", "site-2"}


# ---- the incumbent -----------------------------------------------------------------------------------------------
def test_pooled_loss_and_improves_on_hand_checked():
    """Losses 0.5 on 2 examples and 1.0 on 6 pool to (1 + 6) / 8 = 0.875; the incumbent's 0.6 and 0.9 to
    (1.2 + 5.4) / 8 = 0.825, so the round's mean is worse although site a improved."""
    round_, incumbent = {"a": (0.5, 2), "b": (1.0, 6)}, {"a": (0.6, 2), "b": (0.9, 6)}
    assert pooled_loss(round_, ["a", "b"]) == pytest.approx(0.875)
    assert pooled_loss(incumbent, ["a", "b"]) == pytest.approx(0.825)
    assert not improves_on(round_, incumbent)
    assert improves_on(incumbent, round_)
    assert improves_on(incumbent, incumbent)  # a tie keeps the newer mean
    # only the sites that reported for both count: on site a alone 0.5 <= 0.6
    assert improves_on({"a": (0.5, 2), "c": (9.0, 100)}, incumbent)
    assert improves_on({"c": (9.0, 1)}, incumbent)  # nothing in common: no evidence against the round's mean


def test_robust_server_goes_back_to_the_incumbent_when_the_sent_mean_is_worse():
    """Round 0 from z = 0 (pooled loss 1.0): two equal clients move to e0 and e1, mean (0.5, 0.5, 0, ...). Round 1
    reports loss 2.0 there: worse, so its moves (to 2 e0 and 2 e1) are dropped and the mean goes back to z = 0,
    with the median local step sent. Round 2 searches from z = 0 again and is taken whatever it reports (a
    re-evaluation of the incumbent cannot be worse than itself): the mean becomes (0, 0, 0.5, 0.5, 0, ...)."""
    server = RobustServerES(D, 1.0, 2, seed=1)
    info = server.aggregate(
        [_update("site-1", _unit(0), 0.1, 0.8, start_loss=1.0), _update("site-2", _unit(1), 0.1, 0.6, start_loss=1.0)]
    )
    assert info.notes["restored_to"] is None
    assert np.allclose(server.state(1).mean[:3], [0.5, 0.5, 0.0], atol=1e-12)
    info = server.aggregate(
        [
            _update("site-1", 2 * _unit(0), 0.1, 0.4, start_loss=2.0),
            _update("site-2", 2 * _unit(1), 0.1, 0.2, start_loss=2.0),
        ]
    )
    assert info.notes["restored_to"] == 0 and server.incumbent_round == 0
    assert np.allclose(server.state(2).mean, 0.0, atol=1e-12)
    assert info.sigma_sent == pytest.approx(0.3)  # the median of 0.4 and 0.2
    assert [info.clients[s]["weight"] for s in ("site-1", "site-2")] == [0.0, 0.0]
    info = server.aggregate(
        [_update("site-1", _unit(2), 0.1, start_loss=1.5), _update("site-2", _unit(3), 0.1, start_loss=1.5)]
    )
    assert info.notes["restored_to"] is None and server.incumbent_round == 2
    expected = np.zeros(D)
    expected[2:4] = 0.5
    assert np.allclose(server.state(3).mean, expected, atol=1e-12)


def test_the_incumbent_state_round_trips_and_a_resumed_server_takes_the_round_after_going_back():
    """A server that has just gone back hands that over: loaded into a fresh server, the next round (whose sent mean
    is the incumbent to pycma's rounding) is taken even though it reports a worse loss."""
    server = RobustServerES(D, 1.0, 2, seed=1)
    server.aggregate(
        [_update("site-1", _unit(0), 0.1, start_loss=1.0), _update("site-2", _unit(1), 0.1, start_loss=1.0)]
    )
    server.aggregate(
        [_update("site-1", _unit(2), 0.1, start_loss=2.0), _update("site-2", _unit(3), 0.1, start_loss=2.0)]
    )
    state = server.state_dict()
    assert state["incumbent"] == {
        "rounds_done": 2,
        "round": 0,
        "losses": {"site-1": [1.0, 8], "site-2": [1.0, 8]},
        "went_back": True,
    }
    assert np.array_equal(state["incumbent.incumbent"], np.zeros(D))
    fresh = RobustServerES(D, 1.0, 2, seed=1)
    fresh.load_state_dict(state)
    info = fresh.aggregate(
        [_update("site-1", _unit(4), 0.1, start_loss=1.0 + 1e-12), _update("site-2", _unit(5), 0.1, start_loss=1.0)]
    )
    assert info.notes["restored_to"] is None and fresh.incumbent_round == 2


def test_a_round_row_and_its_progress_line_name_the_round_gone_back_to():
    from fedbpt.core.server.summary import RunSummary

    summary = RunSummary(RunConfig.build(aggregation="fedbpt_robust", num_rounds=5), "acc")
    row = {"round": 3, "clients": ["site-1"], "sigma": 0.25, "best_fitness": 0.1, "median_fitness": 0.2}
    line = summary.progress_line(dict(row, seconds=1.0, restored_to=1))
    assert "back to round 1's prompt | 1.00s" in line
    assert "back to" not in summary.progress_line(dict(row, seconds=1.0, restored_to=None))


# ---- checkpoints ------------------------------------------------------------------------------------------------
def test_robust_run_resumes_bit_for_bit(tmp_path):
    """The robust server's ES tells K + 1 points; its checkpoint records that and a resumed run continues exactly."""
    from test_checkpoint import assert_states_equal, make_cfg, run_fake, sites, state_of

    from fedbpt.core.server import checkpoint
    from fedbpt.core.server.federation import Federation

    cfg = make_cfg(aggregation="fedbpt_robust")
    full = run_fake(cfg, range(6))
    half = run_fake(cfg, range(3))
    path = checkpoint.save(half, 3, str(tmp_path))
    np.random.rand(7)
    resumed = Federation(cfg, sites(cfg))
    assert checkpoint.restore(resumed, checkpoint.load(path)) == 3
    run_fake(cfg, range(3, 6), resumed)
    assert_states_equal(state_of(resumed), state_of(full))
    assert not np.array_equal(state_of(half)["mean"], state_of(full)["mean"])
    # the incumbent crossed the checkpoint: rounds after it went back to a mean chosen before it
    assert [r["restored_to"] for r in resumed.summary.rounds] == [r["restored_to"] for r in full.summary.rounds]
    assert any(r["restored_to"] is not None and r["round"] >= 3 for r in full.summary.rounds)
    assert resumed.server.incumbent_round == full.server.incumbent_round
    assert np.array_equal(resumed.server.incumbent, full.server.incumbent)


def test_a_damaged_incumbent_is_refused_on_load(tmp_path):
    import json

    from test_checkpoint import make_cfg, run_fake

    from fedbpt.core.server import checkpoint
    from fedbpt.errors import CheckpointError

    path = checkpoint.save(run_fake(make_cfg(aggregation="fedbpt_robust"), range(3)), 3, str(tmp_path))
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(bytes(arrays["header"]).decode())
    header["incumbent"]["round"] = 7
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match="incumbent does not fit: incumbent.round is 7, not a round before 3"):
        checkpoint.load(path)


def test_a_robust_checkpoint_without_its_incumbent_resumes_and_starts_keeping_one(tmp_path):
    import json

    from test_checkpoint import make_cfg, run_fake, sites

    from fedbpt.core.server import checkpoint
    from fedbpt.core.server.federation import Federation

    cfg = make_cfg(aggregation="fedbpt_robust")
    path = checkpoint.save(run_fake(cfg, range(3)), 3, str(tmp_path))
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "incumbent.incumbent"}
    header = json.loads(bytes(arrays["header"]).decode())
    del header["incumbent"]
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    resumed = Federation(cfg, sites(cfg))
    assert checkpoint.restore(resumed, checkpoint.load(path)) == 3
    assert (resumed.server.rounds_done, resumed.server.incumbent) == (3, None)
    run_fake(cfg, range(3, 4), resumed)
    assert resumed.server.incumbent_round == 3


def test_checkpoints_do_not_cross_between_faithful_and_robust(tmp_path):
    from test_checkpoint import make_cfg, run_fake, sites

    from fedbpt.core.server import checkpoint
    from fedbpt.core.server.federation import Federation
    from fedbpt.errors import CheckpointError

    path = checkpoint.save(run_fake(make_cfg(), range(2)), 2, str(tmp_path))
    robust = make_cfg(aggregation="fedbpt_robust")
    with pytest.raises(CheckpointError, match="aggregation 'fedbpt' there, 'fedbpt_robust' here"):
        checkpoint.restore(Federation(robust, sites(robust)), checkpoint.load(path))


def test_a_checkpoint_written_before_the_aggregation_was_recorded_resumes_as_fedbpt(tmp_path):
    import json

    from test_checkpoint import make_cfg, run_fake, sites

    from fedbpt.core.server import checkpoint
    from fedbpt.core.server.federation import Federation

    cfg = make_cfg()
    path = checkpoint.save(run_fake(cfg, range(2)), 2, str(tmp_path))
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(bytes(arrays["header"]).decode())
    del header["config"]["aggregation"], header["told_per_round"]
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    assert checkpoint.restore(Federation(cfg, sites(cfg)), checkpoint.load(path)) == 2


# ---- the robust server's state ------------------------------------------------------------------------------------
def _robust_round(server: RobustServerES, rng) -> dict:
    """One round of 3 clients whose reported losses at the sent mean vary, so that some rounds go back."""
    ups = [
        _update(f"site-{i}", rng.normal(size=D), float(rng.random()), float(rng.uniform(0.2, 1.0)), 4 + i, rng.random())
        for i in range(1, 4)
    ]
    return server.aggregate(ups).notes


def test_a_robust_server_loaded_from_another_s_state_dict_aggregates_identically():
    from test_checkpoint import assert_same_state

    a = RobustServerES(D, 1.0, 3, seed=1)
    rng = np.random.default_rng(11)
    for _ in range(4):
        _robust_round(a, rng)
    assert a.incumbent is not None
    b = RobustServerES(D, 1.0, 3, seed=2)
    _robust_round(b, np.random.default_rng(12))
    b.load_state_dict(a.state_dict())
    assert_same_state(b.state_dict(), a.state_dict())
    gone_back = []
    for r in range(8):
        na, nb = _robust_round(a, np.random.default_rng(r)), _robust_round(b, np.random.default_rng(r))
        assert na == nb
        assert np.array_equal(a.state(0).mean, b.state(0).mean) and a.state(0).sigma == b.state(0).sigma
        gone_back.append(na["restored_to"])
    assert any(g is not None for g in gone_back) and any(g is None for g in gone_back)  # both rules were exercised
    assert (a.rounds_done, a.incumbent_round) == (b.rounds_done, b.incumbent_round) == (12, b.incumbent_round)
    assert np.array_equal(a.incumbent, b.incumbent) and a.incumbent_losses == b.incumbent_losses


def _incumbent_round(s):
    s["incumbent"]["round"] = 7


def _cov_asymmetric(s):
    s["es.sm.C"] = s["es.sm.C"] + np.triu(np.full((D, D), 0.5), 1)


@pytest.mark.parametrize(
    "damage, field, problem",
    [
        (_incumbent_round, "incumbent", "does not fit: incumbent.round is 7, not a round before 4"),
        (lambda s: s.pop("incumbent.incumbent"), "incumbent", "does not fit: the incumbent mean is missing"),
        (_cov_asymmetric, "es.sm.C", "is not symmetric"),  # the incumbent intact: it is not taken alone either
    ],
    ids=["incumbent-round", "incumbent-mean-missing", "es-damaged"],
)
def test_a_robust_server_refuses_a_damaged_state_and_stays_as_it_was(damage, field, problem):
    from test_checkpoint import assert_same_state

    from fedbpt.core.state import StateError

    a, b = RobustServerES(D, 1.0, 3, seed=1), RobustServerES(D, 1.0, 3, seed=2)
    rng = np.random.default_rng(11)
    for _ in range(4):
        _robust_round(a, rng)
    _robust_round(b, np.random.default_rng(12))
    assert a.incumbent_round is not None
    before = b.state_dict()
    state = a.state_dict()
    damage(state)
    with pytest.raises(StateError) as err:
        b.load_state_dict(state)
    assert err.value.field == field and err.value.problem.startswith(problem)
    assert_same_state(b.state_dict(), before)


def test_a_robust_state_without_its_incumbent_starts_keeping_one():
    """A state whose server kept no incumbent: the rounds so far are the tells of its CMA-ES, and the next round's
    sent mean becomes the incumbent."""
    a = RobustServerES(D, 1.0, 3, seed=1)
    rng = np.random.default_rng(11)
    for _ in range(3):
        _robust_round(a, rng)
    state = a.state_dict()
    del state["incumbent"], state["incumbent.incumbent"]
    b = RobustServerES(D, 1.0, 3, seed=1)
    b.load_state_dict(state)
    assert (b.rounds_done, b.incumbent_round, b.incumbent, b.incumbent_losses) == (3, None, None, {})
    assert _robust_round(b, rng)["restored_to"] is None and b.incumbent_round == 3


# ---- the collapse, end to end -----------------------------------------------------------------------------------
COLLAPSE = dict(
    num_clients=6,
    iid=False,
    alpha_dir=1.0,
    num_rounds=8,
    k_shot=24,
    server_sigma="paper",
    cov_mode="diag",
    attn_implementation="eager",  # faster on these small passes, same numbers within float tolerance
)


def _collapse_run(aggregation: str, cache: str, seed: int = 1, **overrides) -> tuple[float, float, np.ndarray]:
    """(zero-prompt train accuracy, final train accuracy, predicted-class counts of the final prompt on the union of
    the clients' training shards) of a planted run with label-skewed clients (generated text, no dataset needed)."""
    from test_learning import small_config

    from fedbpt.core.algorithm.search import evaluate
    from fedbpt.core.server.inprocess import run_in_process
    from fedbpt.core.site.runtime import RuntimePool
    from fedbpt.flare.preflight import prepare_config

    cfg = prepare_config(small_config(seed, cache, aggregation=aggregation, **dict(COLLAPSE, **overrides)))
    pool = RuntimePool(cfg, cache)
    try:
        summary = run_in_process(cfg, pool)
        conf = sum(
            evaluate(rt.scorer.label_logits, summary.final_z, rt.train, "ce")["confusion"]
            for rt in pool.runtimes.values()
        )
    finally:
        pool.close()
    return summary.rounds[0]["train_acc"], summary.final["train_acc"], np.asarray(conf).sum(0)


def test_faithful_fedbpt_collapses_under_label_skew_and_the_robust_option_does_not(planted_cache):
    """6 clients with Dir(1.0) label skew (7-9 examples each), Eq. 7 on, 8 rounds, seed 1; the union is balanced.

    Measured on seeds 1 and 2 of this setting: the faithful server ends predicting one class for 47 and 46 of the
    48 examples (train accuracy 0.521 and 0.542, below the zero prompt's 0.583 and 0.604); the robust one ends at
    0.958 and 0.979 with 24 and 23 examples predicted as the minority class. The bounds sit between the two.
    """
    zero, final, predicted = _collapse_run("fedbpt", planted_cache)
    assert predicted.max() / predicted.sum() >= 0.9, predicted  # one class for (nearly) everything
    assert final <= zero, (zero, final)
    zero, final, predicted = _collapse_run("fedbpt_robust", planted_cache)
    assert predicted.min() / predicted.sum() >= 0.3, predicted  # both classes predicted
    assert final >= zero + 0.2, (zero, final)


def test_robust_fedbpt_keeps_what_it_learns_under_strong_label_skew(planted_cache):
    """6 clients with Dir(0.1) label skew, Eq. 7 on, 12 rounds, seed 1: the global prompt reaches train accuracy 1.0
    after round 0. Measured: without the incumbent the averaged local moves drift it away and the run ends at 0.917;
    with it the run ends at 1.0 (rounds whose sent mean lost went back to the best one)."""
    from test_learning import small_run

    summary = small_run(1, planted_cache, **dict(COLLAPSE, aggregation="fedbpt_robust", alpha_dir=0.1, num_rounds=12))
    best = max(r["train_acc"] for r in summary.rounds)
    assert summary.final["train_acc"] >= best - 0.05, [r["train_acc"] for r in summary.rounds]
    assert any(r["restored_to"] is not None for r in summary.rounds)


def test_robust_fedbpt_without_eq7_learns_on_label_skewed_clients(planted_cache):
    """The same 6 Dir(1.0) clients on seed 3, Eq. 7 off (as the SmolLM2 preset runs). Measured over 12 rounds: with the
    client means weighted equally, the global train accuracy stayed at 0.56-0.62 (zero prompt 0.58); weighted by
    shard size (and the best mean kept) it was 0.92 after round 1 and 0.90-0.98 from then on."""
    zero, final, predicted = _collapse_run("fedbpt_robust", planted_cache, seed=3, perturb=False)
    assert final >= zero + 0.2, (zero, final)
    assert predicted.min() / predicted.sum() >= 0.3, predicted

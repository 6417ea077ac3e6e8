"""Wire payloads (plain arrays and numbers, compact covariance) and the server's aggregation."""

import numpy as np
import pytest

from fedbpt.core.algorithm.aggregation import ClientUpdate, ServerES, paper_sigma, reference_sigma
from fedbpt.core.algorithm.search import GlobalState
from fedbpt.core.wire import decode_state, decode_update, encode_state, encode_update
from fedbpt.errors import PayloadError

D = 12


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return isinstance(value, (np.ndarray, int, float)) and not isinstance(value, bool)


def _state():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(D, D))
    return GlobalState(4, rng.normal(size=D), 0.8, m @ m.T / D + np.eye(D))


@pytest.mark.parametrize("mode", ["full", "diag", "none"])
def test_state_payload_holds_only_arrays_and_numbers_and_round_trips(mode):
    s = _state()
    msg = encode_state(s, mode)
    assert _plain(msg)
    back = decode_state(msg)
    assert back.round == 4 and back.sigma == 0.8 and np.array_equal(back.mean, s.mean)
    if mode == "full":
        np.testing.assert_allclose(back.cov, s.cov, rtol=1e-6)  # float32 triangle
        assert msg["cov_tri"].nbytes == D * (D + 1) // 2 * 4
    elif mode == "diag":
        np.testing.assert_allclose(back.cov, np.diag(s.cov), rtol=1e-6)
    else:
        assert back.cov is None


def test_full_covariance_payload_at_d500_is_half_a_megabyte_not_four():
    msg = encode_state(GlobalState(0, np.zeros(500), 1.0, np.eye(500)), "full")
    size = sum(v.nbytes if isinstance(v, np.ndarray) else 8 for v in msg.values())
    assert size < 510_000  # vs 4,052,509 bytes for the reference's pickled CMA-ES object


def test_payloads_survive_nvflare_serialisation(nvflare_fobs):
    from nvflare.apis.dxo import DXO, DataKind, from_shareable

    fobs = nvflare_fobs

    up = encode_update(np.ones(D), 0.5, np.full(8, 0.9), 5, 7, 0.8, train_confusion=np.eye(2, dtype=np.int64))
    assert _plain(up)
    for msg in ({"state": encode_state(_state(), "full"), "evaluate": 1}, up):
        blob = fobs.dumps(DXO(data_kind=DataKind.COLLECTION, data=msg).to_shareable())
        back = from_shareable(fobs.loads(blob)).data
        assert back.keys() == msg.keys()


def _update(**overrides):
    msg = encode_update(np.zeros(D), 0.5, np.full(8, 0.9), 5, 10, 0.8)
    msg.update(overrides)
    return msg


@pytest.mark.parametrize(
    "bad",
    [
        {"mean": np.zeros(D + 1)},
        {"mean": np.zeros(50 * D)},
        {"mean": np.full(D, np.nan)},
        {"mean": np.full(D, np.inf)},
        {"mean": [0.0] * D},
        {"fitness": float("nan")},
        {"fitness": "0.1"},
        {"sigmas": np.full(3, 0.9)},
        {"sigmas": np.full(8, -1.0)},
        {"popsize": 1},
    ],
)
def test_broken_updates_are_rejected(bad):
    with pytest.raises(PayloadError):
        decode_update("site-1", _update(**bad), D, 8)


def test_missing_keys_are_rejected():
    msg = _update()
    del msg["fitness"]
    with pytest.raises(PayloadError, match="fitness"):
        decode_update("site-1", msg, D, 8)


def _updates(k, rng, scale=0.3):
    return [
        ClientUpdate(
            f"site-{i + 1}", rng.normal(size=D) * scale, float(rng.random()), rng.uniform(0.5, 1.0, 8), 5, 10, 0.7
        )
        for i in range(k)
    ]


def test_server_uses_csa_and_tells_the_client_means():
    import cma

    server = ServerES(D, 1.0, 4, seed=1, sigma_rule="paper")
    assert isinstance(server.es.adapt_sigma, cma.sigma_adaptation.CMAAdaptSigmaCSA)
    ups = _updates(4, np.random.default_rng(2))
    info = server.aggregate(ups)
    assert info.sigma_before_tell == pytest.approx(
        paper_sigma([u.fitness for u in ups], [u.sigmas for u in ups], [5] * 4)
    )
    mean = server.state(1).mean
    # the new mean is a convex combination (positive weights, mu = K) of the told client means
    coef, *_ = np.linalg.lstsq(np.stack([u.mean for u in ups]).T, mean, rcond=None)
    assert np.allclose(np.stack([u.mean for u in ups]).T @ coef, mean, atol=1e-8)
    assert np.all(coef > 0) and coef.sum() == pytest.approx(1.0)
    # the best client gets the largest weight
    assert int(np.argmax(coef)) == int(np.argmin([u.fitness for u in ups]))


@pytest.mark.parametrize("rule", ["paper", "reference"])
def test_sent_step_is_the_csa_ratio_times_the_previous_sent_step(rule):
    """Over rounds the sent step follows sent_t = (after_t / before_t) * sent_(t-1), unclamped, and the server's CMA-ES
    updates with the corrected step (Eq. 6 or the reference formula) set just before tell."""
    server = ServerES(D, 1.0, 4, seed=1, sigma_rule=rule)
    rng = np.random.default_rng(3)
    sent, grew = 1.0, False
    for rnd in range(6):
        ups = _updates(4, rng, scale=2.0 if rnd < 3 else 0.01)
        info = server.aggregate(ups)
        expected_before = (
            paper_sigma([u.fitness for u in ups], [u.sigmas for u in ups], [5] * 4)
            if rule == "paper"
            else reference_sigma([u.sigmas for u in ups], 2)
        )
        assert info.sigma_before_tell == pytest.approx(expected_before)
        ratio = info.notes["sigma_after_tell"] / info.sigma_before_tell
        assert info.sigma_sent == pytest.approx(ratio * sent, rel=1e-12)
        assert server.state(rnd + 1).sigma == info.sigma_sent
        grew |= ratio > 1
        sent = info.sigma_sent
    assert grew  # far client means: CSA grew the step in some round, and the sent step grew with it
    assert sent < 0.5  # means that barely move: CSA shrank it, and nothing holds it at 0.5


def test_eq6_sent_ablation_sends_the_post_tell_step():
    server = ServerES(D, 1.0, 4, seed=1, sigma_rule="eq6_sent")
    info = server.aggregate(_updates(4, np.random.default_rng(3)))
    assert info.sigma_sent == info.notes["sigma_after_tell"] == server.state(1).sigma


def test_aggregation_is_deterministic_in_the_seed():
    a, b = ServerES(D, 1.0, 3, seed=9), ServerES(D, 1.0, 3, seed=9)
    for rnd in range(3):
        ups = _updates(3, np.random.default_rng(rnd))
        a.aggregate(ups)
        b.aggregate(ups)
    assert np.array_equal(a.state(3).mean, b.state(3).mean) and a.state(3).sigma == b.state(3).sigma


def test_a_missing_client_moves_the_mean_less_but_the_round_goes_on():
    full, partial = ServerES(D, 1.0, 4, seed=1), ServerES(D, 1.0, 4, seed=1)
    ups = _updates(4, np.random.default_rng(5))
    ups[0].fitness = 0.0  # make the kept client the best
    full.aggregate(ups)
    partial.aggregate(ups[:1])
    assert 0 < np.linalg.norm(partial.state(1).mean) < np.linalg.norm(full.state(1).mean) + np.linalg.norm(ups[0].mean)


def test_a_missing_client_under_box_bounds_keeps_the_server_running():
    """Padding a missing client with a mean outside the box made pycma raise; it is repaired into the box."""
    server = ServerES(D, 1.0, 4, seed=1, bound=0.5)
    rng = np.random.default_rng(6)
    for _ in range(6):
        ups = [u for u in _updates(4, rng, scale=2.0)[:2]]
        for u in ups:
            u.mean = np.clip(u.mean, -0.5, 0.5)  # clients search inside the box
        server.aggregate(ups)
    assert np.all(np.isfinite(server.state(6).mean))


@pytest.mark.parametrize("robust", [False, True])
def test_the_server_covariance_stays_the_identity_at_d500(robust):
    """What --cov_mode diag or full sends carries next to nothing at the paper's scale: pycma's covariance learning
    rates at d = 500 with 10 told points are below 1e-4 a tell (c1 8.0e-6; c_mu 3.5e-5 with rank weights, 6.6e-5
    with the robust server's equal slots), so after 30 rounds of client moves as long as the measured ones (42-49 in z
    at sigma 0.9, near pycma's clipping radius) the diagonal is within 0.2% of 1 and no off-diagonal entry reaches
    0.002. docs/learning.md, "Covariance sent", reads the cov-mode runs with this."""
    from fedbpt.core.algorithm.aggregation import RobustServerES

    d, k = 500, 10
    server = (RobustServerES if robust else ServerES)(d, 1.0, k, seed=1)
    assert server.es.sp.c1 < 1e-5 and server.es.sp.cmu < 1e-4
    rng = np.random.default_rng(0)
    for r in range(30):
        state = server.state(r)
        moves = rng.normal(size=(k, d)) * 2.1 * state.sigma  # |move| about 47 sigma, as measured
        server.aggregate(
            [
                ClientUpdate(
                    f"site-{i}",
                    state.mean + moves[i],
                    float(rng.random()),
                    np.full(8, state.sigma),
                    5,
                    8,
                    0.92 * state.sigma,
                )
                for i in range(k)
            ]
        )
    c = np.asarray(server.es.sm.C)
    assert np.abs(np.diag(c) - 1.0).max() < 2e-3
    assert np.abs(c - np.diag(np.diag(c))).max() < 2e-3


# ---- the server's state ------------------------------------------------------------------------------------------
def _rounds(server: ServerES, rng, n: int, bound: float = 0.0) -> list:
    infos = []
    for _ in range(n):
        ups = _updates(4, rng, scale=2.0)
        for u in ups:
            u.mean = np.clip(u.mean, -bound, bound) if bound else u.mean  # clients search inside the box
        infos.append(server.aggregate(ups))
    return infos


@pytest.mark.parametrize(
    "rule, bound",
    [
        ("paper", 0.0),
        ("reference", 0.0),
        ("eq6_sent", 0.0),
        ("paper", 3.0),
        ("paper", 0.5),  # a box this small holds the stds to its maxstd: pycma rescales its diagonal decoding
    ],
)
def test_a_server_loaded_from_another_s_state_dict_aggregates_identically(rule, bound):
    from test_checkpoint import assert_same_state

    a = ServerES(D, 1.0, 4, seed=1, bound=bound, sigma_rule=rule)
    _rounds(a, np.random.default_rng(7), 3, bound)
    b = ServerES(D, 1.0, 4, seed=2, bound=bound, sigma_rule=rule)  # another seed: the state, not the build, carries
    _rounds(b, np.random.default_rng(8), 1, bound)
    b.load_state_dict(a.state_dict())
    assert_same_state(b.state_dict(), a.state_dict())
    np.random.rand(3)  # numpy's global generator (which pycma's ask() draws from) does not matter to a server
    for _ in range(3):
        (ia,), (ib,) = _rounds(a, np.random.default_rng(9), 1, bound), _rounds(b, np.random.default_rng(9), 1, bound)
        assert (ia.sigma_before_tell, ia.sigma_sent, ia.notes) == (ib.sigma_before_tell, ib.sigma_sent, ib.notes)
        sa, sb = a.state(0), b.state(0)
        assert np.array_equal(sa.mean, sb.mean) and np.array_equal(sa.cov, sb.cov) and sa.sigma == sb.sigma
    assert_same_state(b.state_dict(), a.state_dict())


def test_a_state_written_without_the_diagonal_decoding_continues_as_before():
    """A state that does not hold pycma's diagonal decoding loads, and a run without --bound (whose decoding stays
    the identity) continues exactly."""
    from test_checkpoint import assert_same_state

    a = ServerES(D, 1.0, 4, seed=1)
    _rounds(a, np.random.default_rng(7), 3)
    state = a.state_dict()
    assert state["es"]["decoding"] == {"is_identity": True, "dim": 1} and state["es.sigma_vec.scaling"].shape == ()
    del state["es"]["decoding"], state["es.sigma_vec.scaling"]
    b = ServerES(D, 1.0, 4, seed=2)
    b.load_state_dict(state)
    _rounds(a, np.random.default_rng(9), 2)
    _rounds(b, np.random.default_rng(9), 2)
    assert_same_state(b.state_dict(), a.state_dict())


def _put(state: dict, name: str, index, value) -> None:
    state[name] = state[name].copy()
    state[name][index] = value


SERVER_DAMAGE = [
    ("cov-nan", lambda s: _put(s, "es.sm.C", (0, 1), np.nan), "es.sm.C", "has NaN or inf"),
    ("cov-asymmetric", lambda s: _put(s, "es.sm.C", (0, 1), 5.0), "es.sm.C", "is not symmetric"),
    ("mean-shape", lambda s: s.update({"es.mean": np.zeros(D + 1)}), "es.mean", f"has shape ({D + 1},), not ({D},)"),
    ("fitness-length", lambda s: s.update({"es.fit.fit": np.zeros(3)}), "es.fit.fit", "has shape (3,), not (4,)"),
    ("sigma-zero", lambda s: s["es"]["scalars"].update(sigma=0.0), "es.scalars.sigma", "is 0.0, not a positive"),
    ("sent-sigma", lambda s: s.update(sent_sigma=-1.0), "sent_sigma", "is -1.0, not a positive number"),
    ("missing-pc", lambda s: s.pop("es.pc"), "es.pc", "is missing"),
    ("decoding-zero", lambda s: s.update({"es.sigma_vec.scaling": np.zeros(D)}), "es.sigma_vec.scaling", "has a zero"),
    ("decoding-shape", lambda s: s.update({"es.sigma_vec.scaling": np.ones(3)}), "es.sigma_vec.scaling", "has shape"),
    ("decoding-dim", lambda s: s["es"]["decoding"].update(dim=5), "es.decoding.dim", f"is 5, not 1 or {D}"),
    ("decoding-flag", lambda s: s["es"]["decoding"].update(is_identity=1), "es.decoding.is_identity", "is 1, not true"),
    ("decoding-half", lambda s: s["es"].pop("decoding"), "es.decoding", "is missing"),
]


@pytest.mark.parametrize("damage, field, problem", [d[1:] for d in SERVER_DAMAGE], ids=[d[0] for d in SERVER_DAMAGE])
def test_a_server_refuses_a_damaged_state_and_stays_as_it_was(damage, field, problem):
    from test_checkpoint import assert_same_state

    from fedbpt.core.state import MissingField, StateError

    a, b, twin = ServerES(D, 1.0, 4, seed=1), ServerES(D, 1.0, 4, seed=2), ServerES(D, 1.0, 4, seed=2)
    _rounds(a, np.random.default_rng(7), 3)
    _rounds(b, np.random.default_rng(8), 2)
    _rounds(twin, np.random.default_rng(8), 2)
    before = b.state_dict()
    state = a.state_dict()
    damage(state)
    with pytest.raises(StateError) as err:
        b.load_state_dict(state)
    assert (err.value.field, err.value.problem[: len(problem)]) == (field, problem)
    assert isinstance(err.value, MissingField) == (problem == "is missing")
    assert_same_state(b.state_dict(), before)
    _rounds(b, np.random.default_rng(9), 1)
    _rounds(twin, np.random.default_rng(9), 1)
    assert_same_state(b.state_dict(), twin.state_dict())  # it goes on as if nothing had been offered


def test_a_pycma_without_a_recorded_field_is_refused_before_the_server_changes():
    """Another pycma's layout raises AttributeError, and nothing of the state has been set by then."""
    from test_checkpoint import assert_same_state

    a, b = ServerES(D, 1.0, 4, seed=1), ServerES(D, 1.0, 4, seed=2)
    _rounds(a, np.random.default_rng(7), 2)
    del b.es.fit  # as a pycma keeping its fitness record elsewhere
    before = b.state_dict()
    with pytest.raises(AttributeError, match="fit"):
        b.load_state_dict(a.state_dict())
    assert_same_state(b.state_dict(), before)

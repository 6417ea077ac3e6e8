"""Checkpoint and resume: a resumed run continues bit for bit; broken or foreign checkpoints are refused in one line."""

from __future__ import annotations

import json
import os
import zipfile

import helpers
import numpy as np
import pytest

from fedbpt.core.server import checkpoint, federation
from fedbpt.core.server.checkpoint import CHECKPOINT_FILE
from fedbpt.core.server.federation import Federation
from fedbpt.errors import CheckpointError

D, ITERS = 12, 4
REPO = helpers.REPO

SST2 = helpers.SST2


def make_cfg(**kw) -> dict:
    return helpers.make_cfg(
        dict(intrinsic_dim=D, local_iter=ITERS, num_clients=4, frac=0.75, min_clients=1, num_rounds=6), **kw
    )


def sites(cfg: dict) -> list[str]:
    return [f"site-{i}" for i in range(1, cfg.num_clients + 1)]


def fake_round(fed: Federation, rnd: int) -> None:
    """One round with synthetic client answers that depend only on (round, site) and the received state."""
    targets, _ = fed.start_round(rnd)
    box = fed.cfg.bound or np.inf
    results = {}
    for s in targets:
        rng = np.random.default_rng([rnd, int(s.split("-")[1])])
        results[s] = {
            "mean": np.clip(fed._state.mean + rng.normal(size=D) * fed._state.sigma, -box, box),
            "fitness": float(rng.random()),
            "sigmas": rng.uniform(0.2, 1.5, size=ITERS),
            "sigma_final": float(rng.uniform(0.2, 1.5)),
            "popsize": 5,
            "n_train": 3,
            "dev_loss": float(rng.random()),
            "dev_confusion": rng.integers(0, 3, size=(2, 2)),
        }
        results[s]["dev_n"] = int(results[s]["dev_confusion"].sum())  # the server checks the counts agree
        # the training loss at the received mean (robust FedBPT's incumbent compares these)
        results[s].update(train_loss=float(rng.random()), train_n=3, train_correct=int(rng.integers(0, 4)))
    fed.finish_round(rnd, targets, results)
    np.random.rand(5)  # other users of numpy's global generator (in-process local searches) advance it


def run_fake(cfg: dict, rounds: range, fed: Federation | None = None) -> Federation:
    fed = fed or Federation(cfg, sites(cfg))
    for rnd in rounds:
        fake_round(fed, rnd)
    return fed


def state_of(fed: Federation) -> dict:
    es = fed.server.es
    return {
        "mean": es.mean.copy(),
        "C": es.sm.C.copy(),
        "B": es.sm.B.copy(),
        "pc": es.pc.copy(),
        "ps": es.adapt_sigma.ps.copy(),
        "sigma": float(es.sigma),
        "countiter": es.countiter,
        "sent_sigma": fed.server.sent_sigma,
        "sampler": fed._rng.bit_generator.state,
        "rounds": [(r["round"], r["clients"], r["dev_acc"]) for r in fed.summary.rounds],
        "best": fed.summary.best,
    }


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def assert_same_state(a: dict, b: dict) -> None:
    """Two state dicts (fedbpt.core.state) hold the same: arrays equal in value and dtype, the rest as JSON."""
    from fedbpt.core.server.summary import _json_default

    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], np.ndarray) or isinstance(b[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        else:
            assert json.dumps(a[k], default=_json_default) == json.dumps(b[k], default=_json_default), k


@pytest.mark.parametrize("server_sigma, bound", [("paper", 0.0), ("reference", 0.0), ("paper", 3.0), ("paper", 0.5)])
def test_resumed_server_continues_bit_for_bit(tmp_path, server_sigma, bound):
    cfg = make_cfg(server_sigma=server_sigma, bound=bound)
    full = run_fake(cfg, range(6))
    half = run_fake(cfg, range(3))
    path = checkpoint.save(half, 3, str(tmp_path))
    np.random.rand(7)  # a new server process starts with another global generator state
    resumed = Federation(cfg, sites(cfg))
    assert checkpoint.restore(resumed, checkpoint.load(path)) == 3
    assert_states_equal(state_of(resumed), state_of(half))
    run_fake(cfg, range(3, 6), resumed)
    assert_states_equal(state_of(resumed), state_of(full))
    # and the run really moved: the checkpointed state is not the final one
    assert not np.array_equal(state_of(half)["mean"], state_of(full)["mean"])


def test_checkpoint_is_arrays_and_numbers_only(tmp_path):
    cfg = make_cfg()
    fed = run_fake(cfg, range(2))
    path = checkpoint.save(fed, 2, str(tmp_path))
    with np.load(path, allow_pickle=False) as z:  # would raise on any object (pickled) array
        kinds = {k: z[k].dtype.kind for k in z.files}
        header = json.loads(bytes(z["header"]).decode())
        assert np.array_equal(z["es.mean"], fed.server.es.mean)
        assert np.array_equal(z["es.sm.C"], fed.server.es.sm.C)
    assert set(kinds.values()) <= {"f", "i", "u", "b"}
    assert header["round"] == 2 and header["config"]["intrinsic_dim"] == D and header["config"]["seed"] == cfg.seed
    assert header["es"]["scalars"]["sigma"] == float(fed.server.es.sigma)
    assert header["summary"]["best"] == fed.summary.best
    assert len(header["summary"]["rounds"]) == 2


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    cfg = make_cfg()
    fed = run_fake(cfg, range(1))
    path = checkpoint.save(fed, 1, str(tmp_path))
    before = open(path, "rb").read()
    fake_round(fed, 1)

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(fed, 2, str(tmp_path))
    assert open(path, "rb").read() == before  # the previous checkpoint survives
    assert os.listdir(tmp_path) == [CHECKPOINT_FILE]  # and no temporary file is left behind
    assert checkpoint.load(path).round == 1


@pytest.mark.parametrize("every, expected", [(1, [0, 1, 2, 3, 4]), (2, [1, 3, 4]), (3, [2, 4]), (0, [])])
def test_checkpoint_cadence(every, expected):
    cfg = make_cfg(num_rounds=5, checkpoint_every=every)
    assert [r for r in range(5) if checkpoint.is_due(r, cfg)] == expected


def _corrupt(path: str, how: str) -> None:
    data = bytearray(open(path, "rb").read())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "flipped":  # a byte inside the stored mean: only the zip CRC can tell
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("es.mean.npy")
        data[info.header_offset + 30 + len(info.filename) + info.file_size - 3] ^= 0xFF
    elif how == "garbage":
        data = bytearray(os.urandom(2000))
    elif how == "empty":
        data = bytearray()
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped", "garbage", "empty"])
def test_corrupted_checkpoint_is_refused_in_one_line(tmp_path, how):
    cfg = make_cfg()
    path = checkpoint.save(run_fake(cfg, range(2)), 2, str(tmp_path))
    _corrupt(path, how)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    msg = str(err.value)
    assert "\n" not in msg and path in msg and "corrupted" in msg


def test_checkpoint_with_non_finite_state_is_refused(tmp_path):
    cfg = make_cfg()
    fed = run_fake(cfg, range(2))
    fed.server.es.mean[0] = np.nan
    path = checkpoint.save(fed, 2, str(tmp_path))
    with pytest.raises(CheckpointError, match=r"corrupted: es\.mean has NaN or inf; .* without --resume"):
        checkpoint.load(path)


def test_checkpoint_with_an_incomplete_header_is_refused(tmp_path):
    path = str(tmp_path / CHECKPOINT_FILE)
    header = json.dumps({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "round": 2}).encode()
    np.savez(path, header=np.frombuffer(header, dtype=np.uint8), **{"es.mean": np.zeros(D)})
    with pytest.raises(CheckpointError, match=r"lacks field config: it is damaged or not written by this tool"):
        checkpoint.load(path)


def rewrite(path: str, change) -> None:
    """Apply ``change(header, arrays)`` to a checkpoint and write it back as checkpoint.py writes one."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(bytes(arrays.pop("header")).decode())
    change(header, arrays)
    arrays["header"] = np.frombuffer(json.dumps(header, allow_nan=True).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> bytes:
    """A checkpoint after 2 of 6 rounds (3 of 4 clients a round), made as the resume tests make theirs."""
    cfg = make_cfg()
    path = checkpoint.save(run_fake(cfg, range(2)), 2, str(tmp_path_factory.mktemp("genuine")))
    return open(path, "rb").read()


def _set(*keys_and_value):
    """A change that sets header[k1][k2]... to a value."""
    *keys, value = keys_and_value

    def change(h, _a):
        for k in keys[:-1]:
            h = h[k]
        h[keys[-1]] = value

    return change


def _scalar(name, value):
    return _set("es", "scalars", name, value)


def _array(name, fn):
    def change(_h, a):
        a[name] = fn(a[name].copy())

    return change


def _drop(*keys):
    def change(h, a):
        if keys[0] in a:
            del a[keys[0]]
            return
        for k in keys[:-1]:
            h = h[k]
        del h[keys[-1]]

    return change


def _put(a, index, value):
    a[index] = value
    return a


def _not_pd(c):
    c[0, 1] = c[1, 0] = 10 * np.abs(c).max()
    return c


def _asymmetric(c):
    c[0, 1] += 0.1
    return c


def _best_z_nan(_h, a):
    a["best_z"][0] = np.nan


def _es_none(name):
    def change(h, _a):
        h["es"]["none"].append(name)

    return change


CORRUPTIONS = [
    # rounds done
    ("round-not-integer", _set("round", 2.5), "corrupted: round is 2.5, not an integer"),
    ("round-negative", _set("round", -1), "corrupted: round is -1, outside [0, inf]"),
    ("round-bool", _set("round", True), "corrupted: round is True, not an integer"),
    ("round-beyond-summary", _set("round", 5), "corrupted: round is 5, but summary.rounds records 2 rounds done"),
    ("round-huge", _set("round", 10**30), "but summary.rounds records 2 rounds done"),
    # run record
    ("rounds-not-list", _set("summary", "rounds", {"0": {}}), "summary.rounds is a dict, not a list"),
    ("row-not-dict", _set("summary", "rounds", 1, [1, 2]), "summary.rounds[1] is a list, not a JSON object"),
    ("row-out-of-order", _set("summary", "rounds", 1, "round", 7), "summary.rounds[1].round is 7, not 1"),
    ("summary-not-dict", _set("summary", []), "corrupted: summary is a list, not a JSON object"),
    ("best-not-dict", _set("summary", "best", [0]), "summary.best is a list, not a JSON object"),
    ("best-round-beyond", _set("summary", "best", "round", 9), "summary.best.round is 9, outside [0, 1]"),
    ("best-metric-text", _set("summary", "best", "dev_acc", "high"), "summary.best.dev_acc is 'high', not a number"),
    ("best-z-missing", _drop("best_z"), "lacks field best_z: it is damaged or not written by this tool"),
    ("best-z-nan", _best_z_nan, "corrupted: best_z has NaN or inf"),
    # step size
    ("sigma-huge", _scalar("sigma", 1e300), "es.scalars.sigma is 1e+300, larger than 1e+30"),
    ("sigma-inf", _scalar("sigma", float("inf")), "es.scalars.sigma is inf, not a finite number"),
    ("sigma-nan", _scalar("sigma", float("nan")), "es.scalars.sigma is nan, not a finite number"),
    ("sigma-zero", _scalar("sigma", 0.0), "es.scalars.sigma is 0.0, not a positive number"),
    ("sigma-negative", _scalar("sigma", -0.5), "es.scalars.sigma is -0.5, not a positive number"),
    ("sigma-text", _scalar("sigma", "0.9"), "es.scalars.sigma is '0.9', not a number"),
    ("sent-sigma-huge", _set("sent_sigma", 1e40), "sent_sigma is 1e+40, larger than 1e+30"),
    ("sent-sigma-negative", _set("sent_sigma", -1.0), "sent_sigma is -1.0, not a positive number"),
    # covariance
    ("cov-zero", _array("es.sm.C", np.zeros_like), "es.sm.C has a zero or negative diagonal entry"),
    ("cov-negative-diagonal", _array("es.sm.C", lambda c: _put(c, (3, 3), -1.0)), "zero or negative diagonal"),
    ("cov-nan", _array("es.sm.C", lambda c: _put(c, (0, 1), np.nan)), "corrupted: es.sm.C has NaN or inf"),
    ("cov-not-pd", _array("es.sm.C", _not_pd), "es.sm.C is not positive definite"),
    ("cov-asymmetric", _array("es.sm.C", _asymmetric), "es.sm.C is not symmetric"),
    ("cov-shape", _array("es.sm.C", lambda c: c[:-1]), "es.sm.C has shape (11, 12), not (12, 12)"),
    ("diag-cov-zero", _array("es.dC", lambda v: _put(v, 0, 0.0)), "es.dC has a zero or negative entry"),
    ("eigenvalues-negative", _array("es.sm.D", lambda v: _put(v, 2, -1.0)), "es.sm.D has a zero or negative entry"),
    ("eigenvectors-scaled", _array("es.sm.B", lambda b: 2 * b), "es.sm.B is not orthonormal"),
    # mean
    ("mean-inf", _array("es.mean", lambda v: _put(v, 3, np.inf)), "corrupted: es.mean has NaN or inf"),
    ("mean-nan", _array("es.mean", lambda v: _put(v, 0, np.nan)), "corrupted: es.mean has NaN or inf"),
    ("mean-too-long", _array("es.mean", lambda v: np.append(v, 0.0)), "es.mean has shape (13,), not (12,)"),
    ("mean-matrix", _array("es.mean", lambda v: v.reshape(3, 4)), "es.mean has shape (3, 4), not (12,)"),
    ("mean-float32", _array("es.mean", lambda v: v.astype(np.float32)), "es.mean has dtype float32, not float64"),
    ("mean-none", _es_none("mean"), "es.mean is recorded as None"),
    ("dimension-text", _set("config", "intrinsic_dim", "12"), "config.intrinsic_dim is '12', not an integer"),
    # other CMA-ES state
    ("count-negative", _scalar("countiter", -3), "es.scalars.countiter is -3, outside [0, inf]"),
    ("count-float", _scalar("countevals", 6.5), "es.scalars.countevals is 6.5, not an integer"),
    ("flag-not-bool", _scalar("_flgtelldone", 1), "es.scalars._flgtelldone is 1, not true or false"),
    ("ranking-not-permutation", _array("es.fit.idx", lambda v: _put(v, 0, v[1])), "es.fit.idx is not a permutation"),
    ("fitness-wrong-length", _array("es.fit.fit", lambda v: v[:2]), "es.fit.fit has shape (2,), not (3,)"),
    ("history-text", _set("es", "lists", "fit.hist", [0.1, "x"]), "es.lists.fit.hist is 'x', not a number"),
    ("none-unknown", _es_none("weights"), "es.none names 'weights', not a CMA-ES field this tool records"),
    ("clients-zero", _set("clients_per_round", 0), "clients_per_round is 0, outside [1, inf]"),
    ("sites-not-list", _set("sites", "site-1"), "sites is a str, not a list"),
    ("cma-version-number", _set("cma_version", 4.5), "cma_version is 4.5, not a version string"),
    # missing fields: reported as missing, not as a pycma mismatch
    ("missing-header-field", _drop("sampler_rng"), "lacks field sampler_rng: it is damaged or not written by this"),
    ("missing-es-scalar", _drop("es", "scalars", "countiter"), "lacks field es.scalars.countiter: it is damaged"),
    ("missing-es-list", _drop("es", "lists", "fit.hist"), "lacks field es.lists.fit.hist: it is damaged"),
    ("missing-es-array", _drop("es.pc"), "lacks field es.pc: it is damaged or not written by this tool"),
    ("missing-best-round", _drop("summary", "best", "round"), "lacks field summary.best.round"),
    # random generator states
    ("rng-state-text", _set("sampler_rng", "state", "12x"), "sampler_rng.state is '12x', not a decimal 128-bit"),
    ("rng-state-negative", _set("sampler_rng", "state", "-5"), "sampler_rng.state is '-5', not a decimal 128-bit"),
    ("rng-state-number", _set("sampler_rng", "state", 7), "sampler_rng.state is 7, not a decimal 128-bit integer"),
    ("rng-state-too-big", _set("sampler_rng", "state", str(2**128)), "sampler_rng.state does not fit in 128 bits"),
    ("rng-inc-even", _set("sampler_rng", "inc", "4"), "sampler_rng.inc is even"),
    ("rng-inc-missing", _drop("sampler_rng", "inc"), "lacks field sampler_rng.inc"),
    ("rng-has-uint32", _set("sampler_rng", "has_uint32", 7), "sampler_rng.has_uint32 is 7, outside [0, 1]"),
    ("rng-uinteger", _set("sampler_rng", "uinteger", 2**40), "sampler_rng.uinteger is 1099511627776, outside"),
    ("rng-kind", _set("sampler_rng", "bit_generator", "MT19937"), "sampler_rng.bit_generator is 'MT19937', not"),
    ("rng-not-dict", _set("sampler_rng", [1, 2]), "sampler_rng is a list, not a JSON object"),
    ("global-rng-pos", _set("np_global", "pos", 700), "np_global.pos is 700, outside [0, 624]"),
    ("global-rng-kind", _set("np_global", "kind", "PCG64"), "np_global.kind is 'PCG64', not 'MT19937'"),
    ("global-rng-gauss", _set("np_global", "cached_gaussian", float("nan")), "np_global.cached_gaussian is nan"),
    ("global-rng-keys-zero", _array("np_global_keys", np.zeros_like), "np_global_keys is all zeros"),
    ("global-rng-keys-short", _array("np_global_keys", lambda k: k[:10]), "np_global_keys has shape (10,), not"),
    ("global-rng-keys-dtype", _array("np_global_keys", lambda k: k.astype(np.int64)), "np_global_keys has dtype"),
]


@pytest.mark.parametrize("change, fragment", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_crafted_checkpoint_is_refused_in_one_line(tmp_path, genuine, change, fragment):
    path = str(tmp_path / CHECKPOINT_FILE)
    open(path, "wb").write(genuine)
    rewrite(path, change)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg
    assert msg.startswith(f"checkpoint {path} ") and msg.endswith("start a new run without --resume")
    assert "cma" not in msg.replace("cma_version", "")  # a damaged field is never blamed on pycma


def test_rewritten_genuine_checkpoint_still_resumes_bit_for_bit(tmp_path, genuine):
    """The corruption tests' rewrite changes nothing by itself: what they refuse is the one field they change."""
    path = str(tmp_path / CHECKPOINT_FILE)
    open(path, "wb").write(genuine)
    rewrite(path, lambda h, a: None)
    cfg = make_cfg()
    resumed = Federation(cfg, sites(cfg))
    assert checkpoint.restore(resumed, checkpoint.load(path)) == 2
    assert_states_equal(state_of(resumed), state_of(run_fake(cfg, range(2))))


def test_unusual_but_genuine_states_are_accepted(tmp_path):
    """The checks refuse damage, not states a run can reach."""
    cfg = make_cfg(server_sigma="eq6_sent")
    fresh = Federation(cfg, sites(cfg))  # before any round: pycma's None fields and infinite best fitness
    assert checkpoint.load(checkpoint.save(fresh, 0, str(tmp_path / "fresh"))).round == 0
    fed = run_fake(cfg, range(2))
    fed.server.es.sigma = fed.server.sent_sigma = 1e23  # where the growing eq6_sent step is after 100 rounds
    fed.summary.best["dev_acc"] = fed.summary.rounds[0]["dev_acc"] = float("nan")  # every dev example dropped
    fed.sites = ["site-1", "site-2"]  # sites that failed setup left the rotation: fewer sites than clients a round
    path = checkpoint.save(fed, 2, str(tmp_path / "grown"))
    assert checkpoint.restore(Federation(cfg, sites(cfg)), checkpoint.load(path)) == 2


@pytest.mark.parametrize("written_with, blamed", [("0.0.1", True), (None, False)])
def test_pycma_is_blamed_only_when_the_versions_differ(tmp_path, monkeypatch, written_with, blamed):
    import cma

    from fedbpt.core.algorithm import aggregation

    cfg = make_cfg()
    path = checkpoint.save(run_fake(cfg, range(2)), 2, str(tmp_path))
    if written_with:
        rewrite(path, _set("cma_version", written_with))
    ckpt = checkpoint.load(path)

    def incompatible(*_):
        raise AttributeError("'CMAEvolutionStrategy' object has no attribute 'sm'")

    monkeypatch.setattr(aggregation, "set_es_state", incompatible)
    with pytest.raises(CheckpointError) as err:
        checkpoint.restore(Federation(cfg, sites(cfg)), ckpt)
    msg = str(err.value)
    assert "\n" not in msg and "has no attribute 'sm'" in msg
    if blamed:
        assert f"written with cma 0.0.1, running {cma.__version__}" in msg and "resume with the cma version" in msg
    else:
        assert "written with cma" not in msg and "it is damaged or not written by this tool" in msg


def test_foreign_npz_is_refused(tmp_path):
    path = str(tmp_path / "other.npz")
    np.savez(path, weights=np.ones(3))
    with pytest.raises(CheckpointError, match="corrupted or not a FedBPT checkpoint"):
        checkpoint.load(path)


@pytest.mark.parametrize(
    "change, flag",
    [
        ({"intrinsic_dim": D + 1}, "intrinsic_dim 12 there, 13 here"),
        ({"task_name": "ag_news"}, "task_name 'sst2' there, 'ag_news' here"),
        ({"seed": 99}, "seed 1234 there, 99 here"),
        ({"server_sigma": "reference"}, "server_sigma 'paper' there, 'reference' here"),
    ],
)
def test_checkpoint_of_another_run_is_refused(tmp_path, change, flag):
    cfg = make_cfg()
    path = checkpoint.save(run_fake(cfg, range(2)), 2, str(tmp_path))
    other = make_cfg(**change)
    with pytest.raises(CheckpointError) as err:
        checkpoint.restore(Federation(other, sites(other)), checkpoint.load(path))
    msg = str(err.value)
    assert flag in msg and "belongs to another run" in msg and "\n" not in msg


def test_resume_needs_more_rounds_than_done(tmp_path):
    cfg = make_cfg(num_rounds=2)
    path = checkpoint.save(run_fake(cfg, range(2)), 2, str(tmp_path))
    with pytest.raises(CheckpointError, match="already has 2 rounds: pass num_rounds larger than 2"):
        federation.check_compatible(checkpoint.load(path), cfg)


def test_settings_that_may_change_on_resume_are_accepted(tmp_path):
    cfg = make_cfg()
    path = checkpoint.save(run_fake(cfg, range(2)), 2, str(tmp_path))
    later = make_cfg(num_rounds=10, eval_every=5, round_timeout=60, min_clients=2, data_dir=str(tmp_path))
    assert checkpoint.restore(Federation(later, sites(later)), checkpoint.load(path)) == 2


def test_a_checkpoint_from_before_dev_shot_had_k_shot_dev_examples(tmp_path, monkeypatch):
    """Older checkpoints carry no dev_shot: their dev set had k_shot per class, which is what they are checked as."""
    cfg = make_cfg()
    with monkeypatch.context() as m:  # written as before the option existed
        m.setattr(federation, "MUST_MATCH", tuple(k for k in federation.MUST_MATCH if k != "dev_shot"))
        path = checkpoint.save(run_fake(cfg, range(2)), 2, str(tmp_path))
    assert "dev_shot" not in checkpoint.load(path).header["config"]
    later = make_cfg(num_rounds=10)
    assert checkpoint.restore(Federation(later, sites(later)), checkpoint.load(path)) == 2
    wider = make_cfg(num_rounds=10, dev_shot=cfg.k_shot + 1)
    with pytest.raises(CheckpointError, match="dev_shot 200 there, 201 here"):
        checkpoint.restore(Federation(wider, sites(wider)), checkpoint.load(path))


def test_job_refuses_a_mismatched_checkpoint_before_starting(tmp_path, capsys):
    from fedbpt.cli import main as job

    cfg = make_cfg()
    path = checkpoint.save(run_fake(cfg, range(2)), 2, str(tmp_path))
    rc = job.main(
        ["--num_clients", "4", "--frac", "0.75", "--intrinsic_dim", "50", "--local_iter", str(ITERS), "--resume", path]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: checkpoint ") and "--intrinsic_dim 12 there, 50 here" in err
    assert len(err.splitlines()) == 1


@pytest.mark.skipif(not os.path.isdir(SST2), reason=helpers.NO_SST2)
def test_resume_with_real_clients_matches_uninterrupted_run(tmp_path):
    """Tiny model, 3 clients of which 2 are sampled per round: 4 rounds == 2 rounds, checkpoint, 2 more rounds."""
    from deploy_util import small_sst2
    from helpers import resolve

    from fedbpt.core.server.inprocess import run_in_process
    from fedbpt.core.site.runtime import RuntimePool
    from fedbpt.flare.preflight import prepare_config

    data = small_sst2(str(tmp_path / "data"))
    args = ["--config", os.path.join(REPO, "configs", "tiny.yaml"), "--data_dir", data, "--num_clients", "3"]
    args += ["--frac", "0.67", "--min_clients", "1", "--k_shot", "8", "--torch_threads", "1", "--intrinsic_dim", "16"]
    cache = str(tmp_path / "cache")
    full_cfg = prepare_config(resolve(args + ["--num_rounds", "4"]))
    full = run_in_process(full_cfg, RuntimePool(full_cfg, cache), out_dir=str(tmp_path / "full"))
    first_cfg = prepare_config(resolve(args + ["--num_rounds", "2"]))
    run_in_process(first_cfg, RuntimePool(first_cfg, cache), out_dir=str(tmp_path / "first"))
    ckpt = str(tmp_path / "first" / CHECKPOINT_FILE)
    assert checkpoint.load(ckpt).round == 2
    rest_cfg = prepare_config(resolve(args + ["--num_rounds", "4", "--resume", ckpt]))
    rest = run_in_process(rest_cfg, RuntimePool(rest_cfg, cache), out_dir=str(tmp_path / "rest"))

    assert np.array_equal(rest.final_z, full.final_z)
    assert [r["clients"] for r in rest.rounds] == [r["clients"] for r in full.rounds]
    assert len({tuple(r["clients"]) for r in full.rounds}) > 1  # the client sampler's state mattered
    assert [r["sigma"] for r in rest.rounds] == [r["sigma"] for r in full.rounds]
    assert rest.best == full.best
    a = checkpoint.load(str(tmp_path / "full" / CHECKPOINT_FILE))
    b = checkpoint.load(str(tmp_path / "rest" / CHECKPOINT_FILE))
    assert a.round == b.round == 4
    assert all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays if k.startswith("es."))


# ---- the state dicts a checkpoint holds ---------------------------------------------------------------------------
def test_a_checkpoint_holds_the_federation_s_state_dict(tmp_path):
    fed = run_fake(make_cfg(), range(2))
    path = checkpoint.save(fed, 2, str(tmp_path))
    assert_same_state(checkpoint.load(path).state, fed.state_dict(2))


def test_a_federation_loaded_from_another_s_state_dict_goes_on_identically():
    cfg = make_cfg()
    a = run_fake(cfg, range(3))
    state = a.state_dict(3)
    run_fake(cfg, range(3, 6), a)
    b = run_fake(cfg, range(1))
    assert b.load_state_dict(state) == 3
    assert_same_state(b.state_dict(3), state)
    run_fake(cfg, range(3, 6), b)
    assert_states_equal(state_of(b), state_of(a))


def _even_inc(s):
    s["sampler_rng"]["inc"] = "4"


def _scaled_b(s):
    s["es.sm.B"] = 2 * s["es.sm.B"]


def _row_out_of_order(s):
    s["summary"]["rounds"][1]["round"] = 7


def _keys_zero(s):
    s["np_global_keys"] = np.zeros_like(s["np_global_keys"])


@pytest.mark.parametrize(
    "damage, field",
    [
        (_even_inc, "sampler_rng.inc"),
        (_scaled_b, "es.sm.B"),
        (_row_out_of_order, "summary.rounds[1].round"),
        (_keys_zero, "np_global_keys"),
    ],
)
def test_a_federation_refuses_a_damaged_state_and_changes_nothing(damage, field):
    """A damaged field of any owner (the run's own, the server's, the record's) is found before anything is set."""
    from fedbpt.core.state import StateError

    cfg = make_cfg()
    state = run_fake(cfg, range(3)).state_dict(3)
    damage(state)
    fed = run_fake(cfg, range(2))
    before = fed.state_dict(2)
    with pytest.raises(StateError) as err:
        fed.load_state_dict(state)
    assert err.value.field == field
    assert_same_state(fed.state_dict(2), before)  # numpy's global generator included


def test_a_record_loaded_from_another_s_state_dict_goes_on_identically():
    from fedbpt.core.server.summary import RunSummary

    cfg = make_cfg()
    summary = run_fake(cfg, range(3)).summary
    fresh = RunSummary(cfg, summary.metric)
    fresh.load_state_dict(summary.state_dict())
    assert_same_state(fresh.state_dict(), summary.state_dict())
    evals = {"site-1": {"dev_n": 4, "dev_loss": 0.01, "dev_confusion": np.array([[2, 0], [0, 2]])}}
    for s in (summary, fresh):
        s.add_round(3, np.full(D, 0.5), evals, ["site-1"])
    assert summary.best["round"] == fresh.best["round"] == 3  # all of dev right: the new best
    assert_same_state(fresh.state_dict(), summary.state_dict())


def test_a_record_refuses_a_damaged_state_and_stays_as_it_was():
    from fedbpt.core.state import StateError

    cfg = make_cfg()
    state = run_fake(cfg, range(3)).summary.state_dict()
    state["summary"]["best"]["round"] = 9
    summary = run_fake(cfg, range(2)).summary
    before = summary.state_dict()
    with pytest.raises(StateError, match=r"summary.best.round is 9, outside \[0, 2\]"):
        summary.load_state_dict(state)
    assert_same_state(summary.state_dict(), before)

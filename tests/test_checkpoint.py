"""Checkpoint and resume: a resumed run continues bit for bit; broken or foreign checkpoints are refused in one line."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

from fedbpt import checkpoint
from fedbpt.checkpoint import CHECKPOINT_FILE, CheckpointError
from fedbpt.config import DEFAULTS, validate
from fedbpt.federation import Federation

D, ITERS = 12, 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = os.path.join(REPO, "..", "shared", "data", "sst2")


def make_cfg(**kw) -> dict:
    base = dict(DEFAULTS, intrinsic_dim=D, local_iter=ITERS, num_clients=4, frac=0.75, min_clients=1, num_rounds=6)
    base.update(kw)
    return validate(base)


def sites(cfg: dict) -> list[str]:
    return [f"site-{i}" for i in range(1, cfg["num_clients"] + 1)]


def fake_round(fed: Federation, rnd: int) -> None:
    """One round with synthetic client answers that depend only on (round, site) and the received state."""
    targets, _ = fed.start_round(rnd)
    box = fed.cfg["bound"] or np.inf
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


@pytest.mark.parametrize("server_sigma, bound", [("paper", 0.0), ("reference", 0.0), ("paper", 3.0)])
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
    assert header["round"] == 2 and header["config"]["intrinsic_dim"] == D and header["config"]["seed"] == cfg["seed"]
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
    with pytest.raises(CheckpointError, match=r"corrupted \(es\.mean has NaN or inf"):
        checkpoint.load(path)


def test_checkpoint_with_an_incomplete_header_is_refused(tmp_path):
    path = str(tmp_path / CHECKPOINT_FILE)
    header = json.dumps({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "round": 2}).encode()
    np.savez(path, header=np.frombuffer(header, dtype=np.uint8), **{"es.mean": np.zeros(D)})
    with pytest.raises(CheckpointError, match=r"corrupted \(header lacks config, clients_per_round"):
        checkpoint.load(path)


def test_foreign_npz_is_refused(tmp_path):
    path = str(tmp_path / "other.npz")
    np.savez(path, weights=np.ones(3))
    with pytest.raises(CheckpointError, match="corrupted or not a FedBPT checkpoint"):
        checkpoint.load(path)


@pytest.mark.parametrize(
    "change, flag",
    [
        ({"intrinsic_dim": D + 1}, "--intrinsic_dim 12 there, 13 here"),
        ({"task_name": "ag_news"}, "--task_name 'sst2' there, 'ag_news' here"),
        ({"seed": 99}, "--seed 1234 there, 99 here"),
        ({"server_sigma": "reference"}, "--server_sigma 'paper' there, 'reference' here"),
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
    with pytest.raises(CheckpointError, match="already has 2 rounds: pass --num_rounds larger than 2"):
        checkpoint.check_compatible(checkpoint.load(path), cfg)


def test_settings_that_may_change_on_resume_are_accepted(tmp_path):
    cfg = make_cfg()
    path = checkpoint.save(run_fake(cfg, range(2)), 2, str(tmp_path))
    later = make_cfg(num_rounds=10, eval_every=5, round_timeout=60, min_clients=2, data_dir=str(tmp_path))
    assert checkpoint.restore(Federation(later, sites(later)), checkpoint.load(path)) == 2


def test_job_refuses_a_mismatched_checkpoint_before_starting(tmp_path, capsys):
    import job

    cfg = make_cfg()
    path = checkpoint.save(run_fake(cfg, range(2)), 2, str(tmp_path))
    rc = job.main(
        ["--num_clients", "4", "--frac", "0.75", "--intrinsic_dim", "50", "--local_iter", str(ITERS), "--resume", path]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: checkpoint ") and "--intrinsic_dim 12 there, 50 here" in err
    assert len(err.splitlines()) == 1


@pytest.mark.skipif(not os.path.isdir(SST2), reason=f"SST-2 copy not found at {SST2}")
def test_resume_with_real_clients_matches_uninterrupted_run(tmp_path):
    """Tiny model, 3 clients of which 2 are sampled per round: 4 rounds == 2 rounds, checkpoint, 2 more rounds."""
    from deploy_util import small_sst2

    from fedbpt.client import RuntimePool
    from fedbpt.config import resolve
    from fedbpt.federation import run_in_process

    data = small_sst2(str(tmp_path / "data"))
    args = ["--config", os.path.join(REPO, "configs", "tiny.yaml"), "--data_dir", data, "--num_clients", "3"]
    args += ["--frac", "0.67", "--min_clients", "1", "--k_shot", "8", "--torch_threads", "1", "--intrinsic_dim", "16"]
    cache = str(tmp_path / "cache")
    full_cfg = resolve(args + ["--num_rounds", "4"])
    full = run_in_process(full_cfg, RuntimePool(full_cfg, cache), out_dir=str(tmp_path / "full"))
    first_cfg = resolve(args + ["--num_rounds", "2"])
    run_in_process(first_cfg, RuntimePool(first_cfg, cache), out_dir=str(tmp_path / "first"))
    ckpt = str(tmp_path / "first" / CHECKPOINT_FILE)
    assert checkpoint.load(ckpt).round == 2
    rest_cfg = resolve(args + ["--num_rounds", "4", "--resume", ckpt])
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

"""Deployment-side behaviour of a site: its own data settings, its device, fault injection and abort handling."""

from __future__ import annotations

import json
import os

import helpers
import numpy as np
import pytest

from fedbpt.core.algorithm.search import GlobalState, local_search
from fedbpt.core.data.splits import Examples
from fedbpt.core.data.tasks import get_task
from fedbpt.core.site.settings import SITE_FILE, pick_device, site_settings
from fedbpt.errors import ConfigError, InjectedFault


def make_cfg(**kw) -> dict:
    return helpers.make_cfg(dict(num_clients=3, k_shot=4), **kw)


def write_site_file(folder, **values) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, SITE_FILE), "w") as f:
        json.dump(values, f)
    return str(folder)


# --- site-local data ---------------------------------------------------------------------------------------------


def test_simulator_default_takes_the_shard_named_by_the_site(tmp_path):
    s = site_settings(make_cfg(data_dir=str(tmp_path)), "site-3", None, env={})
    assert (s.data_dir, s.shard, s.seed_index) == (str(tmp_path), 2, 2)


def test_site_file_then_environment_override_the_job(tmp_path):
    job_dir, file_dir, env_dir = (tmp_path / n for n in ("job", "file", "env"))
    for d in (job_dir, file_dir, env_dir):
        d.mkdir()
    local = write_site_file(tmp_path / "local", data_dir=str(file_dir), site_index=2)
    cfg = make_cfg(data_dir=str(job_dir))
    s = site_settings(cfg, "hospital-a", local, env={})
    assert (s.data_dir, s.shard, s.seed_index) == (str(file_dir), 1, 1)
    assert SITE_FILE in s.source
    s = site_settings(cfg, "hospital-a", local, env={"FEDBPT_DATA_DIR": str(env_dir), "FEDBPT_SITE_INDEX": "3"})
    assert (s.data_dir, s.shard, s.seed_index) == (str(env_dir), 2, 2)
    assert "$FEDBPT_DATA_DIR" in s.source and "$FEDBPT_SITE_INDEX" in s.source


def test_a_named_site_reproduces_the_simulator_site_with_the_same_index(tmp_path):
    cfg = make_cfg(data_dir=str(tmp_path))
    named = site_settings(cfg, "hospital-b", None, env={"FEDBPT_SITE_INDEX": "2"})
    sim = site_settings(cfg, "site-2", None, env={})
    assert (named.data_dir, named.shard, named.seed_index) == (sim.data_dir, sim.shard, sim.seed_index)


def test_own_data_is_used_whole_and_seeds_stay_distinct(tmp_path):
    cfg = make_cfg(data_dir=str(tmp_path), model_name="/models/roberta-large")
    a = site_settings(cfg, "hospital-a", None, env={"FEDBPT_SITE_INDEX": "own"})
    b = site_settings(cfg, "hospital-b", None, env={"FEDBPT_SITE_INDEX": "own"})
    assert a.shard is None and b.shard is None and a.seed_index != b.seed_index
    task = get_task("sst2")
    labels = np.array([0, 1] * 20)
    own = Examples([(f"text {i}",) for i in range(40)], labels)
    data = a.shards(task, cfg, own)
    assert len(data.train) == len(data.dev) == 2 * cfg.k_shot  # k per class each, all from this site's file
    assert not set(data.train.texts) & set(data.dev.texts)
    assert set(data.train.texts) | set(data.dev.texts) <= set(own.texts)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"FEDBPT_SITE_INDEX": "4"}, "site_index '4' must be 1..3"),
        ({"FEDBPT_SITE_INDEX": "first"}, "site_index 'first' must be 1..3"),
        ({"FEDBPT_DATA_DIR": "/nonexistent/fedbpt"}, "data folder /nonexistent/fedbpt does not exist"),
        ({}, "site 'hospital-a' has no shard"),
    ],
)
def test_bad_site_settings_are_one_line_errors(env, message):
    cfg = make_cfg(model_name="tiny-random")
    with pytest.raises(ConfigError, match=message) as err:
        site_settings(cfg, "hospital-a", None, env=env)
    assert "\n" not in str(err.value)


def test_broken_site_file_is_reported(tmp_path):
    (tmp_path / SITE_FILE).write_text("{data_dir: oops")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        site_settings(make_cfg(), "site-1", str(tmp_path), env={})
    write_site_file(tmp_path, data_folder="/x")
    with pytest.raises(ConfigError, match=r"keys data_dir, site_index; got \['data_folder'\]"):
        site_settings(make_cfg(), "site-1", str(tmp_path), env={})


# --- devices ----------------------------------------------------------------------------------------------------


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this process sees ``n`` GPUs (what CUDA_VISIBLE_DEVICES leaves visible)."""
    import torch

    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_count


def test_device_is_the_gpu_nvflare_gave_this_client(gpus):
    gpus(1)  # e.g. the simulator's --gpu 0,1 gave this client process CUDA_VISIBLE_DEVICES=1
    assert pick_device(None, env={"CUDA_VISIBLE_DEVICES": "1"}) == "cuda"  # cuda:0 here is physical GPU 1
    gpus(0)  # CUDA_VISIBLE_DEVICES="" or no GPU: the client runs on the CPU
    assert pick_device(None, env={"CUDA_VISIBLE_DEVICES": ""}) == "cpu"


def test_a_gpu_the_client_cannot_see_is_refused(gpus):
    gpus(1)
    with pytest.raises(ConfigError, match=r"device cuda:1: this client sees 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES='3'\)"):
        pick_device("cuda:1", env={"CUDA_VISIBLE_DEVICES": "3"})
    assert pick_device("cuda:0", env={"CUDA_VISIBLE_DEVICES": "3"}) == "cuda:0"
    gpus(0)
    with pytest.raises(ConfigError, match="sees 0 GPU"):
        pick_device("cuda", env={})
    assert pick_device("cpu", env={}) == "cpu"


# --- fault injection --------------------------------------------------------------------------------------------


def test_fault_plan_parsing_and_lookup():
    from fedbpt.flare.drill import FaultInjectingExecutor
    from fedbpt.research.fault import parse

    assert parse("site-2:1:raise, site-3:12:hang,") == {("site-2", 1): "raise", ("site-3", 12): "hang"}
    for bad in ("site-2:1", "site-2:x:raise", "site-2:1:explode"):
        with pytest.raises(ConfigError, match=f"fault plan item '{bad}' is not site:round:mode"):
            parse(bad)
    calls = []

    class Runtime:
        def run_round(self, state, evaluate, should_stop):
            calls.append(state["round"])
            return {"mean": np.zeros(2)}

    ex = FaultInjectingExecutor(config={}, plan="site-2:1:raise")
    msg = {"state": {"round": 1}, "evaluate": 0}
    out = ex.run_round("site-1", Runtime(), msg, lambda: False)
    assert calls == [1] and np.array_equal(out["mean"], np.zeros(2))  # another site's round runs as usual
    with pytest.raises(InjectedFault, match="site-2: injected fault in round 1"):
        ex.run_round("site-2", Runtime(), msg, lambda: False)
    assert calls == [1]


@pytest.mark.parametrize("mode", ["nan", "huge"])
def test_garbage_faults_corrupt_the_upload(mode):
    from fedbpt.core.wire import decode_update
    from fedbpt.errors import PayloadError
    from fedbpt.research.fault import run_with_faults

    upload = {"mean": np.zeros(4), "fitness": 0.5, "sigmas": np.ones(2), "sigma_final": 1.0, "popsize": 2}
    out = run_with_faults(mode, "site-1", 0, lambda: dict(upload), lambda: False)
    decode_update("site-1", upload, 4, 2)  # the clean upload is fine
    with pytest.raises(PayloadError):
        decode_update("site-1", out, 4, 2)


def test_hang_fault_ends_when_the_task_is_aborted():
    from fedbpt.research.fault import run_with_faults

    polls = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(InterruptedError):
        run_with_faults("hang", "site-1", 0, lambda: pytest.fail("a hanging site must not do the work"), should_stop)
    assert len(polls) == 3


# --- abort ------------------------------------------------------------------------------------------------------


def test_local_search_stops_within_one_candidate_evaluation():
    """The abort flag is checked before every CMA-ES generation (one batched evaluation of lambda candidates)."""
    calls = []
    stop_after = 3

    def objective(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return np.sum(x**2, axis=1)

    state = GlobalState(0, np.zeros(5), 1.0, None)
    with pytest.raises(InterruptedError):
        local_search(state, objective, 4, 50, seed=1, should_stop=lambda: len(calls) >= stop_after)
    assert calls == [4] * stop_after  # no evaluation started after the flag was raised


class _FakeWorkspace:
    def get_root_dir(self) -> str:
        return "/nonexistent"


class _FakeEngine:
    def get_workspace(self):
        return _FakeWorkspace()


class _FakeCtx:
    def get_identity_name(self) -> str:
        return "site-1"

    def get_engine(self):
        return _FakeEngine()


def test_executor_passes_the_abort_signal_to_the_local_search(monkeypatch):
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.fl_constant import ReturnCode
    from nvflare.apis.signal import Signal

    from fedbpt.flare import executor as ex

    signal = Signal()
    seen = {}

    class Runtime:
        def run_round(self, state, with_eval, should_stop):
            seen["before"] = should_stop()
            signal.trigger("abort the job")  # NVFlare aborts while the site works
            seen["after"] = should_stop()
            raise InterruptedError("local search aborted")

    monkeypatch.setattr(ex.SiteRuntime, "get", classmethod(lambda cls, cfg, site, root, **options: Runtime()))
    monkeypatch.delenv("FEDBPT_FAULT", raising=False)
    task = DXO(data_kind=DataKind.COLLECTION, data={"state": {"round": 0}, "evaluate": 0}).to_shareable()
    reply = ex.FedBPTExecutor(config={}).execute(ex.TASK_ROUND, task, _FakeCtx(), signal)
    assert seen == {"before": False, "after": True}
    assert reply.get_return_code() == ReturnCode.TASK_ABORTED


def test_the_final_test_pass_runs_on_its_own_threads_and_gives_them_back():
    """--test_threads: torch runs that many threads inside the block and the rounds' number after it, also when the
    pass fails; 0 leaves the rounds' number."""
    import torch

    from fedbpt.core.site.runtime import torch_threads

    before = torch.get_num_threads()
    other = 2 if before != 2 else 3
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(other):
        raise RuntimeError("scoring failed")
    assert torch.get_num_threads() == before
    with torch_threads(0):
        assert torch.get_num_threads() == before


def test_each_client_gets_its_gpu_group_and_runs_on_it(gpus):
    """--gpu [0,1],[2] with three clients: NVFlare deals site-1 and site-3 to group [0,1] and site-2 to [2]; each
    client process then sees its group's GPUs (CUDA_VISIBLE_DEVICES) and runs on the first of them."""
    from fedbpt.core.config import gpu_groups

    assert gpu_groups("[0,1],[2]") == ["0,1", "2"] and gpu_groups("0,1") == ["0", "1"]
    given = {"site-1": "0,1", "site-2": "2", "site-3": "0,1"}  # NVFlare deals the clients to the groups in turn
    for site, visible in given.items():
        gpus(len(visible.split(",")))  # the process sees only its group
        env = {"CUDA_VISIBLE_DEVICES": visible}
        assert pick_device(None, env=env) == "cuda", site
        if len(visible.split(",")) == 1:
            with pytest.raises(ConfigError, match="this client sees 1 GPU"):
                pick_device("cuda:1", env=env)
        else:
            assert pick_device("cuda:1", env=env) == "cuda:1"  # the second GPU of its group


def test_gpu_ids_beyond_the_machine_are_refused_before_any_process_starts(gpus):
    from fedbpt.core.config import Launch
    from fedbpt.flare.preflight import check_machine

    gpus(2)
    cfg = helpers.make_cfg(num_clients=3)
    check_machine(cfg, Launch.build(gpu="[0,1],[1]").for_run(cfg))
    with pytest.raises(ConfigError, match=r"gpu \[0,1\],\[2\]: this machine has 2 GPU\(s\), ids 0\.\.1"):
        check_machine(cfg, Launch.build(gpu="[0,1],[2]").for_run(cfg))

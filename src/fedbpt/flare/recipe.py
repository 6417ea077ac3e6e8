"""FedBPT as an NVFlare 2.9 recipe: one object that runs in SimEnv, PocEnv or ProdEnv, or exports a job folder.

    from nvflare.recipe import SimEnv
    from fedbpt import FedBPTRecipe

    recipe = FedBPTRecipe(preset="configs/tiny.yaml", num_rounds=3)
    recipe.run(SimEnv(num_clients=3))
    recipe.export("jobs")

The job is the same in every environment except for how often clients poll the server for work: 0.05 s in
SimEnv (NVFlare's 2 s would dominate rounds of a few seconds), NVFlare's default (or ``task_request_interval``)
everywhere else, since 20 requests a second from every site would load a real server for nothing.
"""

from __future__ import annotations

import contextlib
import os

from nvflare.recipe.sim_env import SimEnv
from nvflare.recipe.spec import ExecEnv, Recipe

from fedbpt.errors import ConfigError

SIMULATOR_POLL_SECONDS = 0.05
# Our messages are a few KB (at most 0.5 MB: a float32 covariance triangle at d=500). Chunk size 0 makes FOBS
# put numpy arrays inline instead of behind a separate download transaction: one round trip less per message.
INLINE_ARRAYS = {"np_download_chunk_size": 0}


def check_export_dir(path: str) -> None:
    """--export-dir must be a folder or creatable as one (NVFlare replaces only a job folder it made itself)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--export-dir {path} is a file: pass a folder (it is created if missing)")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--export-dir {path} cannot be created ({parent} is not a writable folder)")


def simulated_torch_threads(processes: int) -> int:
    """Torch threads for each of ``processes`` simulated clients on this machine: the cores shared out. Left to
    torch, every process takes all of them, and N processes spin-waiting on each other run several times slower."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def build_job(
    cfg: dict,
    fault_plan: str | None = None,
    task_request_interval: float | None = None,
    run_cfg: dict | None = None,
):
    """The FedJob: our controller and TensorBoard receiver on the server, our executor on every client.

    ``run_cfg``: the dict the components hold (default ``run_config(cfg)``); NVFlare reads it when it writes the
    job, so a caller that keeps it can still change a value before then.
    """
    from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
    from nvflare.job_config.api import FedJob

    from fedbpt.core.checkpoint import attach_to_job
    from fedbpt.core.config import run_config
    from fedbpt.core.wire import TASKS
    from fedbpt.flare.controller import FedBPTController

    run_cfg = run_config(cfg) if run_cfg is None else run_cfg
    job = FedJob(name=cfg["job_name"], min_clients=cfg["min_clients"])
    attach_to_job(job, cfg, run_cfg)
    job.to_server(FedBPTController(config=run_cfg), id="fedbpt_controller")
    job.to_server(TBAnalyticsReceiver(events=["analytix_log_stats"]), id="tb_receiver")
    if task_request_interval is not None:
        job.to_server({"server": {"task_request_interval": task_request_interval}})
    job.to_server(dict(INLINE_ARRAYS))
    if fault_plan:  # research only: the job then ships research/fault.py
        from fedbpt.research.fault import FaultInjectingExecutor

        executor = FaultInjectingExecutor(config=run_cfg, plan=fault_plan)
    else:
        from fedbpt.flare.executor import FedBPTExecutor

        executor = FedBPTExecutor(config=run_cfg)
    job.to_clients(executor, tasks=list(TASKS))
    job.to_clients(dict(INLINE_ARRAYS))
    return job


@contextlib.contextmanager
def _keyword_names():
    """ConfigErrors inside name the keyword options (``num_rounds ...``) rather than job.py's flags."""
    from fedbpt.core.config import with_option_names

    try:
        yield
    except ConfigError as exc:
        raise ConfigError(with_option_names(str(exc))) from None


class FedBPTRecipe(Recipe):
    """FedBPT's job for any NVFlare environment.

    ``config`` / ``preset`` / keyword options: job.py's options by name (flag without dashes), e.g.
    ``FedBPTRecipe(model_name="smollm2-135m", task_name="sst2", num_clients=4)``; checked strictly (ConfigError).
    ``fault_plan``: research drills only (``"site-2:1:raise"``, see research/fault.py).
    ``task_request_interval``: seconds between a deployed client's polls (default: NVFlare's).
    """

    def __init__(
        self,
        config: dict | None = None,
        *,
        preset: str | None = None,
        fault_plan: str | None = None,
        task_request_interval: float | None = None,
        **options,
    ) -> None:
        if fault_plan:
            from fedbpt.research.fault import parse

            parse(fault_plan)
        t = task_request_interval
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < float("inf")):
            raise ConfigError(
                f"task_request_interval must be a positive number of seconds, got {task_request_interval}"
            )
        from fedbpt.core.preflight import prepare_config

        with _keyword_names():
            self.config = prepare_config(config, preset, **options)
        self.fault_plan = fault_plan or None
        self.task_request_interval = task_request_interval
        from fedbpt.core.config import run_config

        self._run_cfg = run_config(self.config)
        super().__init__(build_job(self.config, self.fault_plan, task_request_interval, self._run_cfg))

    @property
    def job(self):
        """The FedJob (for callers that drive NVFlare themselves, as job.py's guarded simulator does)."""
        return self._job

    @contextlib.contextmanager
    def simulator_polling(self):
        """Within this block the job's clients poll every 0.05 s, as SimEnv runs it; restored afterwards."""
        with self._temporary_exec_params(
            server_exec_params={"server": {"task_request_interval": SIMULATOR_POLL_SECONDS}}
        ):
            yield self._job

    def run(self, env: ExecEnv, server_exec_params: dict | None = None, client_exec_params: dict | None = None):
        if not isinstance(env, SimEnv):
            return super().run(env, server_exec_params, client_exec_params)
        n = env.num_clients or len(env.clients or [])
        if n != self.config["num_clients"]:
            raise ConfigError(
                f"SimEnv runs {n} clients, the recipe's num_clients is {self.config['num_clients']}: give both the same"
                f" number (site-i takes shard i of num_clients)"
            )
        from fedbpt.core.preflight import preflight

        with _keyword_names():
            preflight(self.config)
        with self._sharing_cores(env.num_threads or n), self.simulator_polling():
            return super().run(env, server_exec_params, client_exec_params)

    @contextlib.contextmanager
    def _sharing_cores(self, processes: int):
        """torch_threads 0 in SimEnv: the client processes share this machine's cores (simulated_torch_threads)."""
        if self.config["torch_threads"]:
            yield
            return
        self._run_cfg["torch_threads"] = simulated_torch_threads(processes)
        try:
            yield
        finally:
            self._run_cfg["torch_threads"] = 0

    def export(self, job_dir: str, server_exec_params=None, client_exec_params=None, env: ExecEnv | None = None):
        """The job folder ``job_dir/<job_name>`` for ``nvflare job submit``, polling as deployed (see module doc)."""
        with _keyword_names():
            check_export_dir(job_dir)
        super().export(job_dir, server_exec_params, client_exec_params, env)

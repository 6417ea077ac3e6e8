"""FedBPT as an NVFlare 2.9 recipe: one object that runs in SimEnv, PocEnv or ProdEnv, or exports a job folder.

    from nvflare.recipe import SimEnv
    from fedbpt import FedBPTRecipe

    recipe = FedBPTRecipe(preset="configs/tiny.yaml", num_rounds=3)
    recipe.run(SimEnv(num_clients=3))
    recipe.export("jobs")

Every run option is a typed keyword of the recipe (or a field of the :class:`RunConfig` passed as ``config``). The
recipe prepares the configuration once (paths, research inputs, the checkpoint to resume), and checks it against
this machine once when it runs in a simulator (``flare.preflight``). ``FedBPTSimEnv`` (flare.simulator) is the
simulator environment job.py uses: NVFlare's SimEnv with a workspace this tool owns, signal handling and a summary
on every outcome.

The job is the same in every environment except for how often clients poll the server for work: 0.05 s in
SimEnv (NVFlare's 2 s would dominate rounds of a few seconds), NVFlare's default (or ``task_request_interval``)
everywhere else, since 20 requests a second from every site would load a real server for nothing.
"""

from __future__ import annotations

import contextlib
import os

from nvflare.recipe.sim_env import SimEnv
from nvflare.recipe.spec import ExecEnv, Recipe

from fedbpt.core.config import Launch, RunConfig, load
from fedbpt.errors import ConfigError, opt

SIMULATOR_POLL_SECONDS = 0.05
# Our messages are a few KB (at most 0.5 MB: a float32 covariance triangle at d=500). Chunk size 0 makes FOBS
# put numpy arrays inline instead of behind a separate download transaction: one round trip less per message.
INLINE_ARRAYS = {"np_download_chunk_size": 0}


def check_export_dir(path: str) -> None:
    """--export-dir must be a folder or creatable as one (NVFlare replaces only a job folder it made itself)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(
            f"{opt('export_dir')} {path} is a file: pass a folder (it is created if missing)", "export_dir"
        )
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{opt('export_dir')} {path} cannot be created ({parent} is not a writable folder)", "export_dir"
        )


def simulated_torch_threads(processes: int) -> int:
    """Torch threads for each of ``processes`` simulated clients on this machine: the cores shared out. Left to
    torch, every process takes all of them, and N processes spin-waiting on each other run several times slower."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def build_job(cfg: RunConfig, job_cfg: dict, fault_plan: str | None = None, task_request_interval: float | None = None):
    """The FedJob: our controller and TensorBoard receiver on the server, our executor on every client.

    ``job_cfg``: the dict the components hold (``cfg.to_job()``); NVFlare reads it when it writes the job, so the
    recipe can still set a value that depends on the environment (torch threads, the resume file) before then.
    """
    from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
    from nvflare.job_config.api import FedJob

    from fedbpt.core.wire import TASKS
    from fedbpt.flare.controller import FedBPTController

    job = FedJob(name=cfg.job_name, min_clients=cfg.min_clients)
    job.to_server(FedBPTController(config=job_cfg), id="fedbpt_controller")
    job.to_server(TBAnalyticsReceiver(events=["analytix_log_stats"]), id="tb_receiver")
    if task_request_interval is not None:
        job.to_server({"server": {"task_request_interval": task_request_interval}})
    job.to_server(dict(INLINE_ARRAYS))
    if fault_plan:  # drills only: the job then ships flare/drill.py and research/fault.py
        from fedbpt.flare.drill import FaultInjectingExecutor

        executor = FaultInjectingExecutor(config=job_cfg, plan=fault_plan)
    else:
        from fedbpt.flare.executor import FedBPTExecutor

        executor = FedBPTExecutor(config=job_cfg)
    job.to_clients(executor, tasks=list(TASKS))
    job.to_clients(dict(INLINE_ARRAYS))
    return job


class FedBPTRecipe(Recipe):
    """FedBPT's job for any NVFlare environment.

    Args:
        config: a :class:`fedbpt.core.config.RunConfig` to start from (default: the defaults, or ``preset``'s).
        preset: a YAML or JSON preset file (job.py's ``--config``); the keywords below win over it.
        fault_plan: failure drills only (``"site-2:1:raise"``, see research/fault.py).
        task_request_interval: seconds between a deployed client's polls (default: NVFlare's).
        job_name ... test_threads: the run options, one keyword per :class:`RunConfig` field, of its name and type
            (its help: ``RunConfig.model_fields[name].description``, or ``python job.py --help``); None leaves the
            preset's value or the default.

    Checked strictly: a ConfigError names the keyword and the fix.
    """

    def __init__(
        self,
        config: RunConfig | None = None,
        *,
        preset: str | None = None,
        fault_plan: str | None = None,
        task_request_interval: float | None = None,
        job_name: str | None = None,
        num_clients: int | None = None,
        min_clients: int | None = None,
        num_rounds: int | None = None,
        frac: float | None = None,
        seed: int | None = None,
        round_timeout: int | None = None,
        checkpoint_every: int | None = None,
        resume: str | None = None,
        task_name: str | None = None,
        data_dir: str | None = None,
        k_shot: int | None = None,
        dev_shot: int | None = None,
        iid: bool | None = None,
        alpha_dir: float | None = None,
        partition: str | None = None,
        model_name: str | None = None,
        model_cache_dir: str | None = None,
        n_prompt_tokens: int | None = None,
        intrinsic_dim: int | None = None,
        cat_or_add: str | None = None,
        label_encoding: str | None = None,
        prompt_placement: str | None = None,
        device: str | None = None,
        precision: str | None = None,
        attn_implementation: str | None = None,
        max_batch_tokens: int | None = None,
        batch_size: int | None = None,
        sigma: float | None = None,
        bound: float | None = None,
        local_iter: int | None = None,
        local_popsize: int | None = None,
        local_adaptation: str | None = None,
        loss_type: str | None = None,
        perturb: bool | None = None,
        perturb_rate: float | None = None,
        eq7: str | None = None,
        aggregation: str | None = None,
        server_sigma: str | None = None,
        cov_mode: str | None = None,
        eval_clients: str | None = None,
        eval_every: int | None = None,
        test_eval: str | None = None,
        site_metrics: str | None = None,
        torch_threads: int | None = None,
        test_threads: int | None = None,
    ) -> None:
        options = {k: v for k, v in locals().items() if k in RunConfig.model_fields and v is not None}
        if fault_plan:
            from fedbpt.research.fault import parse

            parse(fault_plan)
        t = task_request_interval
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < float("inf")):
            raise ConfigError(
                f"task_request_interval must be a positive number of seconds, got {task_request_interval}"
            )
        if config is not None and preset is not None:
            raise ConfigError("give config or preset, not both: a RunConfig already holds its preset's values")
        if config is not None:
            cfg = config.replace(**options) if options else config
        else:
            cfg, _ = load(preset, options)
        from fedbpt.flare.preflight import prepare_config

        self.config = prepare_config(cfg)
        self.fault_plan = fault_plan or None
        self.task_request_interval = task_request_interval
        self._job_cfg = self.config.to_job()
        self._shipped = False
        super().__init__(build_job(self.config, self._job_cfg, self.fault_plan, task_request_interval))

    @property
    def job(self):
        """The FedJob (for callers that drive NVFlare themselves)."""
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
            self._ship_resume()
            return super().run(env, server_exec_params, client_exec_params)
        from fedbpt.flare.preflight import preflight
        from fedbpt.flare.simulator import FedBPTSimEnv

        n = env.num_clients or len(env.clients or [])
        if n != self.config.num_clients:
            raise ConfigError(
                f"SimEnv runs {n} clients, the recipe's {opt('num_clients')} is {self.config.num_clients}: give both "
                "the same number (site-i takes shard i of num_clients)",
                option="num_clients",
            )
        launch = env.launch if isinstance(env, FedBPTSimEnv) else Launch(threads=env.num_threads, gpu=env.gpu_config)
        preflight(self.config, launch)
        if isinstance(env, FedBPTSimEnv):
            self._job_cfg["resume"] = env.prepare(self.config)
        with self._sharing_cores(env.num_threads or n), self.simulator_polling():
            return super().run(env, server_exec_params, client_exec_params)

    @contextlib.contextmanager
    def _sharing_cores(self, processes: int):
        """torch_threads 0 in SimEnv: the client processes share this machine's cores (simulated_torch_threads)."""
        if self.config.torch_threads:
            yield
            return
        self._job_cfg["torch_threads"] = simulated_torch_threads(processes)
        try:
            yield
        finally:
            self._job_cfg["torch_threads"] = 0

    def _ship_resume(self) -> None:
        """A deployment's server cannot read this machine's files: the --resume checkpoint travels in the job."""
        if self.config.resume and not self._shipped:
            from fedbpt.flare.job_files import attach_to_job

            attach_to_job(self._job, self.config.model_dump(), self._job_cfg)
            self._shipped = True

    def export(self, job_dir: str, server_exec_params=None, client_exec_params=None, env: ExecEnv | None = None):
        """The job folder ``job_dir/<job_name>`` for ``nvflare job submit``, polling as deployed (see module doc)."""
        check_export_dir(job_dir)
        self._ship_resume()
        super().export(job_dir, server_exec_params, client_exec_params, env)

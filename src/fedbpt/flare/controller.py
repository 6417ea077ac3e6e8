"""NVFlare controller: moves the Federation's messages to the sites and their answers back.

What a person follows a run by (a progress line per round, sites done in a slow round, the best round) goes to the
``fedbpt.console`` logger; everything else to the controller's own logger, which job.py keeps off its console.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np
from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.controller_spec import ClientTask
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller, Task
from nvflare.apis.signal import Signal
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.fuel.utils import fobs

from fedbpt.core.config import RunConfig
from fedbpt.core.server.checkpoint import after_round, open_run
from fedbpt.core.server.federation import Federation
from fedbpt.core.server.summary import CONSOLE_LOGGER, verdict
from fedbpt.core.wire import ERROR_HEADER, TASK_EVAL, TASK_ROUND, TASK_SETUP
from fedbpt.errors import CheckpointError, TooFewClients

SCALARS = ("dev_acc", "test_acc", "train_acc", "train_loss", "sigma", "best_fitness")
SLOW_SECONDS = 20.0  # a broadcast running longer than this reports each answer as it arrives
console = logging.getLogger(CONSOLE_LOGGER)


class Arrivals:
    """NVFlare's ``result_received_cb`` for one broadcast: counts the sites' answers and, once the broadcast has run
    longer than ``slow_after`` seconds, reports each one (``round 3: sites done 2/4``), so that a long round does not
    look like a hung one. Never raises: an exception here would fail the task in NVFlare."""

    def __init__(
        self,
        label: str,
        expected: int,
        slow_after: float = SLOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        report: Callable[[str], None] = console.info,
    ) -> None:
        self.label, self.expected, self.slow_after = label, expected, slow_after
        self.clock, self.report = clock, report
        self.start = clock()
        self.done = 0
        self._lock = threading.Lock()

    def __call__(self, client_task: ClientTask | None = None, fl_ctx: FLContext | None = None) -> None:
        try:
            with self._lock:
                self.done += 1
                done = self.done
            if self.clock() - self.start > self.slow_after:
                self.report(f"{self.label}: sites done {done}/{self.expected}")
        except Exception:  # a report that failed must not fail the site's task
            pass


class FedBPTController(Controller):
    def __init__(self, config: dict, task_check_period: float = 0.05) -> None:
        super().__init__(task_check_period=task_check_period)
        self.config = config  # the job's dict (RunConfig.to_job): NVFlare writes the job from these arguments
        self.cfg: RunConfig | None = None
        self.fed: Federation | None = None
        self.out_dir = ""
        self.app_config_dir = ""
        self.lost: set[str] = set()  # sites that missed a deadline: later tasks still go to them, nobody waits
        self.errors: dict[str, str] = {}  # site -> why it failed the last broadcast (one line)

    def start_controller(self, fl_ctx: FLContext) -> None:
        workspace = fl_ctx.get_engine().get_workspace()
        self.out_dir = workspace.get_run_dir(fl_ctx.get_job_id())
        self.app_config_dir = workspace.get_app_config_dir(fl_ctx.get_job_id())

    def stop_controller(self, fl_ctx: FLContext) -> None:
        pass

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result, fl_ctx) -> None:
        self.log_warning(fl_ctx, f"ignored a late result of {task_name} from {client.name}")
        if client.name in self.lost:  # it is alive and free again: later rounds wait for it
            self.lost.discard(client.name)
            self.log_info(fl_ctx, f"{client.name} is back: later rounds wait for it again")

    def _broadcast(
        self,
        name: str,
        msg: dict,
        targets: list[str],
        fl_ctx: FLContext,
        abort_signal: Signal,
        timeout: int = -1,
        label: str = "",
    ):
        """Send ``msg`` to ``targets``; return (site -> payload, bytes sent per site, site -> bytes received).

        Waits for every target except lost ones (which missed an earlier deadline), at most ``timeout`` seconds
        (default --round_timeout). Byte counts are the FOBS-serialised Shareables, i.e. what NVFlare puts on the
        wire before framing. ``label`` names the broadcast in the sites-done lines of a slow one.
        """
        shareable = DXO(data_kind=DataKind.COLLECTION, data=msg).to_shareable()
        bytes_down = len(fobs.dumps(shareable))
        timeout = self.cfg.round_timeout if timeout < 0 else timeout
        arrivals = Arrivals(label or name, len(targets))
        task = Task(name=name, data=shareable, timeout=timeout, result_received_cb=arrivals)
        self.broadcast_and_wait(
            task,
            fl_ctx,
            targets=targets,
            min_responses=max(1, len([t for t in targets if t not in self.lost])),
            wait_time_after_min_received=0,
            abort_signal=abort_signal,
        )
        results, bytes_up = {}, {}
        self.errors = {}
        answered = {ct.client.name for ct in task.client_tasks if ct.result is not None}
        for site in sorted(set(targets) - answered - self.lost):
            self.log_warning(fl_ctx, f"{site} did not answer {name} in time: later rounds will not wait for it")
            self.errors[site] = "no answer in time"
        self.lost = (self.lost | set(targets)) - answered
        for ct in task.client_tasks:
            site, result = ct.client.name, ct.result
            if result is None:
                continue
            rc = result.get_return_code(ReturnCode.OK)
            if rc != ReturnCode.OK:
                why = result.get_header(ERROR_HEADER) or rc
                self.log_warning(fl_ctx, f"{site} failed {name}: {why}")
                self.errors[site] = str(why)
                continue
            try:
                results[site] = from_shareable(result).data
            except Exception as exc:  # not a DXO at all
                self.log_warning(fl_ctx, f"{site} sent an unreadable result for {name}: {exc}")
                continue
            bytes_up[site] = len(fobs.dumps(result))
        return results, bytes_down, bytes_up

    def _log_scalars(self, fl_ctx: FLContext, step: int, row: dict) -> None:
        for tag in SCALARS:
            value = row.get(tag)
            if value is not None and np.isfinite(value):
                send_analytic_dxo(
                    self, create_analytic_dxo(tag, float(value), AnalyticsDataType.SCALAR, global_step=step), fl_ctx
                )

    def _stop(self, fl_ctx: FLContext, reason: str, panic: bool = True) -> None:
        """Record why the run stopped (the last checkpoint stays as it is) and end the job."""
        if self.fed.summary.status == "running":
            self.fed.summary.fail(reason)
        path = self.fed.summary.write(self.out_dir)
        self.log_error(fl_ctx, f"run stopped: {reason}; summary in {path}")
        if panic:
            self.system_panic(reason, fl_ctx)

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        try:
            self._control_flow(abort_signal, fl_ctx)
        except Exception as exc:  # a server-side bug must still leave a summary that says failed
            self.log_exception(fl_ctx, f"control flow failed: {exc}")
            if self.fed is not None:
                self._stop(fl_ctx, f"server error {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            else:
                self.system_panic(f"server error {type(exc).__name__}: {exc}", fl_ctx)

    def _failed(self, sites) -> str:
        return ", ".join(f"{s} ({self.errors.get(s, 'no result')})" for s in sorted(sites))

    def _control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        sites = [c.name for c in fl_ctx.get_engine().get_clients()]
        self.cfg = cfg = RunConfig.from_job(self.config)
        self.fed = fed = Federation(cfg, sites)
        try:
            first = open_run(fed, self.app_config_dir)
        except CheckpointError as exc:
            self._stop(fl_ctx, str(exc))
            return
        # Sites load data and model before the first round, so --round_timeout measures rounds, not setup.
        ready, _, _ = self._broadcast(
            TASK_SETUP, {"setup": 1}, fed.sites, fl_ctx, abort_signal, timeout=0, label="setup"
        )
        failed = set(fed.sites) - set(ready)
        if len(ready) < cfg.min_clients:
            self._stop(
                fl_ctx,
                f"{len(ready)} of {len(fed.sites)} sites set up, fewer than --min_clients {cfg.min_clients}"
                f" (failed: {self._failed(failed)}; see their logs)",
            )
            return
        if failed:
            self.log_warning(fl_ctx, f"left out of every round, setup failed: {self._failed(failed)}")
            fed.drop_sites(failed)
        for rnd in range(first, cfg.num_rounds):
            if abort_signal.triggered:
                self._stop(fl_ctx, f"aborted before round {rnd}", panic=False)
                return
            targets, msg = fed.start_round(rnd)
            results, bytes_down, bytes_up = self._broadcast(
                TASK_ROUND, msg, targets, fl_ctx, abort_signal, label=f"round {rnd}"
            )
            if abort_signal.triggered:
                self._stop(fl_ctx, f"aborted during round {rnd}", panic=False)
                return
            try:
                row = fed.finish_round(rnd, targets, results, bytes_down, bytes_up)
            except TooFewClients as exc:
                self._stop(fl_ctx, str(exc))
                return
            after_round(fed, rnd, self.out_dir)
            console.info(fed.summary.progress_line(row))
            self._log_scalars(fl_ctx, rnd, row)
        results, _, _ = self._broadcast(
            TASK_EVAL, fed.final_message(), fed.sites, fl_ctx, abort_signal, label="final evaluation"
        )
        row = fed.finish(results)
        console.info(fed.summary.progress_line(row))
        self._log_scalars(fl_ctx, cfg.num_rounds, row)
        path = fed.summary.write(self.out_dir)
        self.log_info(fl_ctx, f"summary written to {path}")
        console.info(fed.summary.best_line())
        line = verdict(fed.summary.to_dict())
        if line:  # job.py prints it after the summary's path; a deployment's server log has it here
            self.log_info(fl_ctx, line)

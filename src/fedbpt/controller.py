"""NVFlare controller: moves the Federation's messages to the sites and their answers back."""

from __future__ import annotations

import numpy as np
from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller, Task
from nvflare.apis.signal import Signal
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.fuel.utils import fobs

from fedbpt.executor import TASK_EVAL, TASK_ROUND
from fedbpt.federation import Federation, TooFewClients

SCALARS = ("dev_acc", "test_acc", "train_acc", "train_loss", "sigma", "best_fitness")


class FedBPTController(Controller):
    def __init__(self, config: dict, task_check_period: float = 0.05) -> None:
        super().__init__(task_check_period=task_check_period)
        self.config = config
        self.fed: Federation | None = None
        self.out_dir = ""

    def start_controller(self, fl_ctx: FLContext) -> None:
        self.out_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())

    def stop_controller(self, fl_ctx: FLContext) -> None:
        pass

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result, fl_ctx) -> None:
        self.log_warning(fl_ctx, f"ignored a late result of {task_name} from {client.name}")

    def _broadcast(self, name: str, msg: dict, targets: list[str], fl_ctx: FLContext, abort_signal: Signal):
        """Send ``msg`` to ``targets``; return (site -> payload, bytes sent per site, site -> bytes received).

        Byte counts are the FOBS-serialised Shareables, i.e. what NVFlare puts on the wire before framing.
        """
        shareable = DXO(data_kind=DataKind.COLLECTION, data=msg).to_shareable()
        bytes_down = len(fobs.dumps(shareable))
        task = Task(name=name, data=shareable, timeout=int(self.config["round_timeout"]))
        self.broadcast_and_wait(
            task,
            fl_ctx,
            targets=targets,
            min_responses=len(targets),
            wait_time_after_min_received=0,
            abort_signal=abort_signal,
        )
        results, bytes_up = {}, {}
        for ct in task.client_tasks:
            site, result = ct.client.name, ct.result
            if result is None:
                self.log_warning(fl_ctx, f"{site} sent no result for {name}")
                continue
            rc = result.get_return_code(ReturnCode.OK)
            if rc != ReturnCode.OK:
                self.log_warning(fl_ctx, f"{site} failed {name}: {rc}")
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

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        sites = [c.name for c in fl_ctx.get_engine().get_clients()]
        self.fed = fed = Federation(self.config, sites)
        for rnd in range(self.config["num_rounds"]):
            if abort_signal.triggered:
                return
            targets, msg = fed.start_round(rnd)
            results, bytes_down, bytes_up = self._broadcast(TASK_ROUND, msg, targets, fl_ctx, abort_signal)
            if abort_signal.triggered:
                return
            try:
                row = fed.finish_round(rnd, targets, results, bytes_down, bytes_up)
            except TooFewClients as exc:
                fed.summary.write(self.out_dir)
                self.system_panic(str(exc), fl_ctx)
                return
            self.log_info(fl_ctx, fed.summary.progress_line(row))
            self._log_scalars(fl_ctx, rnd, row)
        results, _, _ = self._broadcast(TASK_EVAL, fed.final_message(), fed.sites, fl_ctx, abort_signal)
        row = fed.finish(results)
        self.log_info(fl_ctx, fed.summary.progress_line(row))
        self._log_scalars(fl_ctx, self.config["num_rounds"], row)
        path = fed.summary.write(self.out_dir)
        best = fed.summary.best
        self.log_info(
            fl_ctx,
            f"summary written to {path}; best round by dev {fed.summary.metric}: {best['round']} "
            f"(dev {best['dev_acc']}, test {best['test_acc']})",
        )

"""NVFlare controller: each round, send the global state, collect local results, aggregate, log, summarise."""

from __future__ import annotations

import time

import numpy as np
from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller, Task
from nvflare.apis.signal import Signal
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.fuel.utils import fobs

from fedbpt.aggregation import ServerES
from fedbpt.config import clients_per_round
from fedbpt.executor import TASK_EVAL, TASK_ROUND
from fedbpt.summary import RunSummary
from fedbpt.tasks import get_task
from fedbpt.wire import PayloadError, decode_update, encode_state


class FedBPTController(Controller):
    def __init__(self, config: dict, task_check_period: float = 0.05) -> None:
        super().__init__(task_check_period=task_check_period)
        self.config = config

    def start_controller(self, fl_ctx: FLContext) -> None:
        cfg = self.config
        self.k = clients_per_round(cfg)
        self.server = ServerES(cfg["intrinsic_dim"], cfg["sigma"], self.k, cfg["seed"], cfg["bound"],
                               cfg["server_sigma"])
        self.out_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        self.summary = RunSummary(cfg, get_task(cfg["task_name"]).metric)

    def stop_controller(self, fl_ctx: FLContext) -> None:
        pass

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result, fl_ctx) -> None:
        self.log_warning(fl_ctx, f"ignored late result of {task_name} from {client.name}")

    # ---- helpers --------------------------------------------------------------------------------------
    def _sites(self, fl_ctx: FLContext) -> list[str]:
        return sorted(c.name for c in fl_ctx.get_engine().get_clients())

    def _broadcast(self, name: str, msg: dict, targets: list[str], fl_ctx, abort_signal) -> tuple[dict, int]:
        shareable = DXO(data_kind=DataKind.COLLECTION, data=msg).to_shareable()
        bytes_down = len(fobs.dumps(shareable))
        task = Task(name=name, data=shareable, timeout=int(self.config["round_timeout"]))
        self.broadcast_and_wait(task, fl_ctx, targets=targets, min_responses=len(targets),
                                wait_time_after_min_received=0, abort_signal=abort_signal)
        results = {}
        for ct in task.client_tasks:
            result = ct.result
            site = ct.client.name
            if result is None:
                self.log_warning(fl_ctx, f"{site} sent no result for {name}")
                continue
            rc = result.get_return_code(ReturnCode.OK)
            if rc != ReturnCode.OK:
                self.log_warning(fl_ctx, f"{site} failed {name}: {rc}")
                continue
            try:
                results[site] = (from_shareable(result).data, len(fobs.dumps(result)))
            except Exception as exc:  # not a DXO at all
                self.log_warning(fl_ctx, f"{site} sent an unreadable result for {name}: {exc}")
        return results, bytes_down

    def _log_scalars(self, fl_ctx: FLContext, step: int, values: dict) -> None:
        for tag, value in values.items():
            if value is not None and np.isfinite(value):
                dxo = create_analytic_dxo(tag, float(value), AnalyticsDataType.SCALAR, global_step=step)
                send_analytic_dxo(self, dxo, fl_ctx)

    # ---- the federated loop ---------------------------------------------------------------------------
    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        cfg = self.config
        sites = self._sites(fl_ctx)
        rng = np.random.default_rng([cfg["seed"], 7])
        for rnd in range(cfg["num_rounds"]):
            if abort_signal.triggered:
                return
            t0 = time.time()
            targets = sorted(rng.choice(sites, size=min(self.k, len(sites)), replace=False).tolist())
            state = self.server.state(rnd)
            evaluate = rnd % cfg["eval_every"] == 0
            msg = {"state": encode_state(state, cfg["cov_mode"]), "evaluate": int(evaluate)}
            results, bytes_down = self._broadcast(TASK_ROUND, msg, targets, fl_ctx, abort_signal)
            if abort_signal.triggered:
                return
            updates, evals, bytes_up = [], {}, []
            for site, (payload, nbytes) in sorted(results.items()):
                try:
                    updates.append(decode_update(site, payload, cfg["intrinsic_dim"], cfg["local_iter"]))
                except PayloadError as exc:
                    self.log_error(fl_ctx, f"round {rnd}: rejected the update of {site}: {exc}")
                    continue
                evals[site] = payload
                bytes_up.append(nbytes)
            missing = sorted(set(targets) - {u.site for u in updates})
            if missing:
                self.log_warning(fl_ctx, f"round {rnd}: no usable update from {', '.join(missing)}")
            if len(updates) < cfg["min_clients"]:
                reason = (f"round {rnd}: {len(updates)} usable updates, fewer than --min_clients {cfg['min_clients']}"
                          f" (missing: {', '.join(missing)})")
                self.summary.fail(reason)
                self.summary.write(self.out_dir)
                self.system_panic(reason, fl_ctx)
                return
            info = self.server.aggregate(updates)
            fits = np.array([u.fitness for u in updates])
            row = self.summary.add_round(
                rnd, state.mean, evals, [u.site for u in updates], sigma=info.sigma_sent,
                sigma_before_tell=info.sigma_before_tell, best_fitness=float(fits.min()),
                median_fitness=float(np.median(fits)), clipped=info.clipped, seconds=time.time() - t0,
                bytes_down=bytes_down, bytes_up=int(np.mean(bytes_up)) if bytes_up else 0,
            )
            self.log_info(fl_ctx, self.summary.progress_line(row))
            self._log_scalars(fl_ctx, rnd, {k: row.get(k) for k in
                                            ("dev_acc", "test_acc", "train_acc", "train_loss", "sigma", "best_fitness")})

        final_state = self.server.state(cfg["num_rounds"])
        results, _ = self._broadcast(TASK_EVAL, {"state": encode_state(final_state, "none")}, sites, fl_ctx,
                                     abort_signal)
        row = self.summary.add_final(cfg["num_rounds"], final_state.mean, {s: p for s, (p, _) in results.items()})
        self.log_info(fl_ctx, self.summary.progress_line(row))
        self._log_scalars(fl_ctx, cfg["num_rounds"], {k: row.get(k) for k in ("dev_acc", "test_acc", "train_acc")})
        path = self.summary.write(self.out_dir)
        self.log_info(fl_ctx, f"summary written to {path}; best round {self.summary.best['round']} by dev "
                              f"{self.summary.metric} {self.summary.best['dev_acc']}")


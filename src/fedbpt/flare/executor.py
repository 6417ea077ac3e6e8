"""NVFlare executor: unwraps the server's state, runs this site's FedBPT round, wraps the upload."""

from __future__ import annotations

import traceback
from collections.abc import Callable

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal

from fedbpt.core.config import RunConfig
from fedbpt.core.site.runtime import SiteRuntime
from fedbpt.core.wire import ERROR_HEADER, TASK_EVAL, TASK_ROUND, TASK_SETUP
from fedbpt.errors import ConfigError


class FedBPTExecutor(Executor):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = config  # the job's dict (RunConfig.to_job): NVFlare writes the job from these arguments

    def run_round(self, site: str, runtime: SiteRuntime, msg: dict, should_stop: Callable[[], bool]) -> dict:
        """One federated round on this site: the upload. (The research fault injector overrides this.)"""
        return runtime.run_round(msg["state"], bool(msg["evaluate"]), should_stop)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site = fl_ctx.get_identity_name()
        try:
            msg = from_shareable(shareable).data
            # the site's workspace root: local, one per site, kept through the simulator's respawns (core.site.cache)
            cache_root = fl_ctx.get_engine().get_workspace().get_root_dir()
            runtime = SiteRuntime.get(
                RunConfig.from_job(self.config), site, cache_root, setup_cache=True, hub_offline=True
            )
            if abort_signal.triggered:
                return make_reply(ReturnCode.TASK_ABORTED)
            if task_name == TASK_ROUND:
                out = self.run_round(site, runtime, msg, lambda: abort_signal.triggered)
            elif task_name == TASK_SETUP:
                out = {"train_n": len(runtime.train), **runtime.take_setup_seconds()}  # not a round's set-up
            elif task_name == TASK_EVAL:
                out = runtime.final_evaluate(msg)
            else:
                self.log_error(fl_ctx, f"unknown task {task_name}")
                return make_reply(ReturnCode.TASK_UNKNOWN)
        except InterruptedError:
            return make_reply(ReturnCode.TASK_ABORTED)
        except ConfigError as exc:
            self.log_error(fl_ctx, f"{site}: {exc}")
            return _error_reply(str(exc))
        except Exception as exc:
            self.log_error(fl_ctx, f"{site}: task {task_name} failed:\n{traceback.format_exc()}")
            return _error_reply(f"{type(exc).__name__}: {exc}")
        return DXO(data_kind=DataKind.COLLECTION, data=out).to_shareable()


def _error_reply(message: str) -> Shareable:
    """A failure that says why in one line (the server names it in its reasons; the traceback stays in the log)."""
    reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    first = message.strip().splitlines()[0] if message.strip() else "no message"
    reply.set_header(ERROR_HEADER, first[:300])
    return reply

"""The executor of failure drills: FedBPT's, with the rounds a fault plan names broken as it says (research.fault).

A job holds it (and research/fault.py) only when a plan was given: ``FedBPTRecipe(fault_plan=...)`` or
``FEDBPT_FAULT=...`` in the environment of job.py.
"""

from __future__ import annotations

from collections.abc import Callable

from fedbpt.flare.executor import FedBPTExecutor
from fedbpt.research.fault import parse, run_with_faults


class FaultInjectingExecutor(FedBPTExecutor):
    """FedBPT's executor, with the rounds that ``plan`` names broken in the way it says."""

    def __init__(self, config: dict, plan: str) -> None:
        super().__init__(config)
        self.plan = plan
        self._faults = parse(plan)

    def run_round(self, site: str, runtime, msg: dict, should_stop: Callable[[], bool]) -> dict:
        rnd = int(msg["state"]["round"])
        return run_with_faults(
            self._faults.get((site, rnd)),
            site,
            rnd,
            lambda: super(FaultInjectingExecutor, self).run_round(site, runtime, msg, should_stop),
            should_stop,
        )

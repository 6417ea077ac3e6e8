"""The paper's baselines as server strategies with ServerES's interface (``state(round)``, ``aggregate(updates)``).

- FedAvg-BBT: the server averages the clients' local means and final local step sizes, weighted by their
  numbers of training examples; no covariance is kept or sent (the local searches restart from the identity).
- local-only: every site searches alone. Its state (mean, last local step size) lives on the server, which only
  stores what the site uploaded and sends it back. Server-side state because the simulator may rebuild a site's
  process between rounds (threads < clients), and because measuring a site's prompt "on the union of all
  clients' data" needs every site to evaluate every prompt: the one broadcast carries all K prompts, each site
  evaluates them on its own shard and reports the summed confusion matrix, so the pooled accuracy is the mean
  over sites of each site's prompt on the union, and no data leaves a site. (A real local-only deployment would
  send nothing; this traffic is the price of measuring it.)
Both search locally exactly as FedBPT's clients do (same local CMA-ES, iterations, popsize and objective), so a
comparison isolates the aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedbpt.core.algorithm.aggregation import AggregationInfo, ClientUpdate, RobustServerES, ServerES, client_stats
from fedbpt.core.algorithm.search import GlobalState

AGGREGATIONS = ("fedbpt", "fedbpt_robust", "fedavg", "local")  # --aggregation, built by make_server
SERVER_ES = ("fedbpt", "fedbpt_robust")  # the aggregations with a server CMA-ES: checkpointed, resumable


@dataclass
class LocalStates(GlobalState):
    """Every site's own state: ``mean`` is (K, d), one row per site in ``sites`` order; ``sigmas`` is (K,)."""

    sites: tuple[str, ...] = ()
    sigmas: np.ndarray | None = None


class FedAvgServer:
    def __init__(self, d: int, sigma0: float) -> None:
        self.mean = np.zeros(d)
        self.sigma = float(sigma0)

    def state(self, round_: int) -> GlobalState:
        return GlobalState(round_, self.mean.copy(), self.sigma, None)

    def aggregate(self, updates: list[ClientUpdate]) -> AggregationInfo:
        if not updates:
            raise ValueError("no client updates to aggregate")
        w = np.array([u.n_train for u in updates], dtype=np.float64)
        w /= w.sum()
        start = self.mean.copy()
        self.mean = np.sum([wi * u.mean for wi, u in zip(w, updates)], axis=0)
        self.sigma = float(np.sum([wi * u.sigma_final for wi, u in zip(w, updates)]))
        return AggregationInfo(self.sigma, self.sigma, clients=client_stats(updates, start, w))


class LocalOnlyServer:
    def __init__(self, d: int, sigma0: float, sites: list[str]) -> None:
        self.sites = tuple(sorted(sites))
        self.means = np.zeros((len(self.sites), d))
        self.sigmas = np.full(len(self.sites), float(sigma0))

    def state(self, round_: int) -> LocalStates:
        return LocalStates(
            round_, self.means.copy(), float(self.sigmas.mean()), None, sites=self.sites, sigmas=self.sigmas.copy()
        )

    def aggregate(self, updates: list[ClientUpdate]) -> AggregationInfo:
        if not updates:
            raise ValueError("no client updates to aggregate")
        for u in updates:
            k = self.sites.index(u.site)
            self.means[k], self.sigmas[k] = u.mean, u.sigma_final
        sigma = float(self.sigmas.mean())
        return AggregationInfo(sigma, sigma)


def make_server(
    aggregation: str,
    d: int,
    sigma0: float,
    clients_per_round: int,
    sites: list[str],
    seed: int = 0,
    bound: float = 0.0,
    sigma_rule: str = "paper",
):
    """The server strategy named by --aggregation (one of AGGREGATIONS)."""
    if aggregation == "fedavg":
        return FedAvgServer(d, sigma0)
    if aggregation == "local":
        return LocalOnlyServer(d, sigma0, sites)
    cls = RobustServerES if aggregation == "fedbpt_robust" else ServerES
    return cls(d, sigma0, clients_per_round, seed, bound, sigma_rule)

"""Server-side aggregation: the global CMA-ES told the clients' local means, with the FedBPT step-size rule.

The server never samples candidates itself: its "population" is the K client means after local search. Two
consequences shape this module:
- pycma at d >= 300 defaults to TPA step-size adaptation, which assumes the told points came from ask(); told
  foreign points it never shrinks sigma. We pick CSA explicitly.
- the local searches, not the server's sigma, produced the points, so the server's sigma is reset before
  tell() to a value derived from the local step sizes (paper Eq. 6, or the reference example's rule). The step
  sent to the clients is the previous sent step scaled by the change CSA made to that corrected step, as in the
  reference code (:func:`sigma_sent`).

:class:`RobustServerES` (``--aggregation fedbpt_robust``) keeps that server CMA-ES and changes the rules that make
the faithful one collapse under label skew and drift (docs/algorithm.md, "Robust FedBPT"): the client means are
recombined with weights by shard size, the step sent on is the median of the clients' final local steps, and the
server keeps the best mean so far by the pooled training loss the clients report for the mean they received.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np

from fedbpt.core.algorithm.cma_state import SIGMA_MAX
from fedbpt.core.algorithm.cma_state import check_state as check_es_state
from fedbpt.core.algorithm.cma_state import set_state as set_es_state
from fedbpt.core.algorithm.cma_state import state_dict as es_state_dict
from fedbpt.core.algorithm.search import GlobalState, make_es
from fedbpt.core.state import StateError, member, number

log = logging.getLogger(__name__)

SIGMA_FLOOR = 0.5  # the reference example's floor, as written in its sent-step code (it never binds; see below)
# server_sigma rule -> (step the server's CMA-ES update uses, how the step sent to the clients follows from it)
SIGMA_RULES = {"paper": ("eq6", "ratio"), "reference": ("reference", "ratio"), "eq6_sent": ("eq6", "after_tell")}


@dataclass
class ClientUpdate:
    site: str
    mean: np.ndarray
    fitness: float
    sigmas: np.ndarray
    popsize: int
    n_train: int
    sigma_final: float  # the local step after the last tell (FedAvg-BBT and local-only continue from it)
    start_loss: float | None = None  # the site's training loss at the mean it received (its upload's train_loss)


@dataclass
class AggregationInfo:
    sigma_before_tell: float
    sigma_sent: float
    clipped: int = 0
    notes: dict = field(default_factory=dict)
    clients: dict = field(default_factory=dict)  # site -> what the server did with its upload (see client_stats)


def client_stats(
    updates: list[ClientUpdate], start: np.ndarray, weights: np.ndarray, kept: np.ndarray | None = None
) -> dict:
    """Per client, what the aggregation saw and did: its uploaded local fitness, the recombination weight its mean
    got, how far (Euclidean, in z) its local search moved from the mean it started at, the fraction of that move the
    server kept after pycma's Mahalanobis clipping (1: unclipped), and its final local step. All of it derives from
    the upload itself: nothing more about a site's data is revealed."""
    kept = np.ones(len(updates)) if kept is None else kept
    return {
        u.site: {
            "fitness": float(u.fitness),
            "weight": float(w),
            "moved": float(np.linalg.norm(np.asarray(u.mean) - start)),
            "kept": float(k),
            "sigma_final": float(u.sigma_final),
        }
        for u, w, k in zip(updates, weights, kept)
    }


def rank_weights(fitnesses: np.ndarray, weights: list[float]) -> np.ndarray:
    """The weight pycma's tell() gives each told point: ``weights`` (best first) by rank of fitness, lowest best."""
    by_rank = np.zeros(len(fitnesses))
    w = np.asarray(weights, dtype=np.float64)[: len(fitnesses)]
    by_rank[: len(w)] = w  # pycma's positive weights: ranks past mu get none
    out = np.zeros(len(fitnesses))
    out[np.argsort(np.asarray(fitnesses), kind="stable")] = by_rank
    return out


def shard_weights(updates: list[ClientUpdate]) -> np.ndarray:
    """Each client's share of the examples behind this round's answers: the pooled training loss is the
    shard-weighted mean of the local losses, so these weights aggregate the local moves toward it (FedAvg's)."""
    n = np.array([u.n_train for u in updates], dtype=np.float64)
    if n.sum() <= 0:
        return np.full(len(updates), 1.0 / len(updates))
    return n / n.sum()


def weighted_told_points(mean: np.ndarray, points: list[np.ndarray], weights: np.ndarray, k: int) -> list[np.ndarray]:
    """The points to tell a CMA-ES that gives each of its k recombined points weight 1/k, so that its new mean is
    ``mean + sum_i weights[i] (points[i] - mean)``: each move from the mean is scaled by k weights[i]."""
    return [mean + k * w * (np.asarray(x, dtype=np.float64) - mean) for x, w in zip(points, weights)]


def median_local_step(updates: list[ClientUpdate]) -> float:
    """The robust rule's sent step: the median of the clients' final local steps. The local CSA runs shrink their
    step as they converge; carrying the median on lets the federation converge with them (the faithful sent step
    stays near sigma0 for hundreds of rounds), and the median ignores a client whose step blew up or collapsed."""
    return float(np.median([u.sigma_final for u in updates]))


def pooled_loss(losses: dict[str, tuple[float, int]], sites) -> float:
    """The shard-weighted mean of the sites' (loss, n_train) over ``sites``: the training loss on their union."""
    n = np.array([losses[s][1] for s in sites], dtype=np.float64)
    loss = np.array([losses[s][0] for s in sites], dtype=np.float64)
    return float(np.sum(n * loss) / np.sum(n))


def improves_on(round_losses: dict[str, tuple[float, int]], incumbent_losses: dict[str, tuple[float, int]]) -> bool:
    """Whether the mean behind ``round_losses`` is at least as good as the incumbent: the pooled training loss of both
    on the sites that reported for both (all of them when every client takes part). No common site, no evidence:
    the round's mean is taken."""
    common = sorted(set(round_losses) & set(incumbent_losses))
    if not common:
        return True
    return pooled_loss(round_losses, common) <= pooled_loss(incumbent_losses, common)


def paper_sigma(fitnesses: np.ndarray, sigmas: list[np.ndarray], popsizes: list[int]) -> float:
    """Paper Eq. 6: 2 * sqrt( sum_{k in S'} sum_j sigma_{k,j}^2 / (|S| lambda_k) ), S' = the best |S|/2 clients.

    |S|/2 is rounded down and at least 1 client is kept.
    """
    s = len(fitnesses)
    best = np.argsort(np.asarray(fitnesses), kind="stable")[: max(1, s // 2)]
    total = sum(float(np.sum(np.square(sigmas[k]))) / popsizes[k] for k in best)
    return 2.0 * float(np.sqrt(total / s))


def reference_sigma(sigmas: list[np.ndarray], mu_local: int) -> float:
    """The NVFlare example's rule before tell: sqrt( sum_k sum_j sigma_{k,j}^2 / m / mu_local )."""
    m = len(sigmas)
    return float(np.sqrt(sum(float(np.sum(np.square(s))) for s in sigmas) / m / mu_local))


def reference_sigma_sent(sigma_after: float, sigma_before: float, previous_sent: float) -> float:
    """The NVFlare example's sent-step code, statement by statement.

    ``local_sigma_current`` is updated before the two clamps, so the second clamp undoes whatever the first did:
    the result is exactly ``sigma_after / sigma_before * previous_sent``. It falls below 0.5 and grows when CSA
    grows the server's step; neither clamp ever changes it.
    """
    sigma = sigma_after / sigma_before * previous_sent
    local_sigma_current = sigma
    if sigma < SIGMA_FLOOR:
        sigma = SIGMA_FLOOR
    if sigma > local_sigma_current:
        sigma = local_sigma_current
    return sigma


def sigma_before_tell(rule: str, fitnesses: np.ndarray, sigmas: list[np.ndarray], popsizes: list[int]) -> float:
    """The server's step for its own CMA-ES update: the local searches, not the server, produced the told points."""
    if SIGMA_RULES[rule][0] == "eq6":
        return paper_sigma(fitnesses, sigmas, popsizes)
    return reference_sigma(sigmas, max(1, popsizes[0] // 2))  # pycma's default mu for popsize lambda


def sigma_sent(rule: str, sigma_after: float, sigma_before: float, previous_sent: float) -> float:
    """The step the clients start from next round.

    paper and reference scale the previous sent step by the change CSA made to the corrected step (the reference
    code). eq6_sent sends the post-tell step itself: an ablation of what not to do, since Eq. 6 returns about
    2 * sqrt(I / (2 lambda)) = 1.8 times the local steps and the sent step then grows every round.
    """
    if SIGMA_RULES[rule][1] == "after_tell":
        return float(sigma_after)
    return float(reference_sigma_sent(sigma_after, sigma_before, previous_sent))


def mahalanobis_clip_threshold(d: int) -> float:
    """pycma's tell() rescales told points whose Mahalanobis distance from the mean exceeds this."""
    return float(np.sqrt(d) + 2.0 * d / (d + 2.0))


class ServerES:
    """The global CMA-ES over z in R^d; popsize = mu = the number of clients per round."""

    # pycma's tell() rescales told points beyond mahalanobis_clip_threshold onto it (None: its default check), as
    # the paper's and the reference's server does: all client means kept 84-95% of their move in the measured runs
    check_points = None

    def _es_options(self, k: int) -> tuple[int, dict]:
        """(popsize, extra pycma options): K told points, pycma's default decreasing weights by rank (the paper's)."""
        return k, {"CMA_mu": k}

    def __init__(
        self, d: int, sigma0: float, clients_per_round: int, seed: int, bound: float = 0.0, sigma_rule: str = "paper"
    ) -> None:
        if sigma_rule not in SIGMA_RULES:
            raise ValueError(f"unknown server sigma rule {sigma_rule!r}: one of {', '.join(SIGMA_RULES)}")
        self.sigma_rule = sigma_rule
        self.bound = float(bound)
        self.k, extra = self._es_options(clients_per_round)  # points told per round
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es = make_es(np.zeros(d), sigma0, self.k, seed, bound, extra, adaptation="csa")
        self.sent_sigma = float(sigma0)

    def _mean_in_bounds(self) -> np.ndarray:
        """The mean as a point of the box. With --bound, pycma keeps its mean in genotype space, which its
        boundary transform maps onto the box; near a small box's faces the genotype lies outside it, and a client
        whose CMA-ES started from that point would refuse it. The phenotype is what clients search around."""
        mean = np.array(self.es.mean, dtype=np.float64)
        if self.bound <= 0:
            return mean
        inside = np.asarray(self.es.boundary_handler.transform(mean), dtype=np.float64)
        return np.clip(inside, -self.bound, self.bound)

    @property
    def d(self) -> int:
        return self.es.N

    def state(self, round_: int) -> GlobalState:
        return GlobalState(
            round_,
            self._mean_in_bounds(),
            self.sent_sigma,
            np.array(self.es.sm.C, dtype=np.float64),
        )

    def aggregate(self, updates: list[ClientUpdate]) -> AggregationInfo:
        """Tell the client means with their local fitnesses; set sigma by the chosen rule."""
        from threadpoolctl import threadpool_limits

        if not updates:
            raise ValueError("no client updates to aggregate")
        fit = np.array([u.fitness for u in updates], dtype=np.float64)
        sigmas = [np.asarray(u.sigmas, dtype=np.float64) for u in updates]
        with threadpool_limits(1), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pycma warns that told solutions were not sampled by ask()
            self.es.ask()  # pycma only accepts tell() after ask(); the samples are not used
            before = sigma_before_tell(self.sigma_rule, fit, sigmas, [u.popsize for u in updates])
            self.es.sigma = before
            limit = mahalanobis_clip_threshold(self.d)
            dist = np.array([self.es.mahalanobis_norm(u.mean - self.es.mean) for u in updates])
            kept = np.minimum(1.0, limit / np.maximum(dist, 1e-300))  # the share of each move the clipping keeps
            clipped = int(np.sum(dist > limit))
            if clipped:
                log.info(
                    "%d of %d client means lie beyond Mahalanobis distance %.2f: they are rescaled onto it",
                    clipped,
                    len(updates),
                    limit,
                )
            start = self._mean_in_bounds()  # the mean the clients searched from (the state sent this round)
            x = self._told_points(updates, kept)
            if len(x) < self.k:
                # pycma needs mu = K points. A missing client is told as the current mean ranked last: it adds
                # nothing to the mean shift or the rank-mu update, so the round moves on the answers it got.
                # With --bound the mean itself may lie outside the box (pycma bounds the phenotype), and pycma
                # refuses told points outside it: use the mean repaired into the box.
                missing = self.k - len(x)
                x += [self._mean_in_bounds()] * missing
                fit = np.concatenate([fit, np.full(missing, fit.max() + 1.0)])
            weights = self._weights(updates, fit)
            self.es.tell(x, fit.tolist(), check_points=self.check_points)
            after = float(self.es.sigma)
            # The server's own sigma is reset before every tell, so only the sent step carries over between rounds.
            self.es.sigma = self._sent(updates, after, before)
        self.sent_sigma = float(self.es.sigma)
        return AggregationInfo(
            before,
            self.sent_sigma,
            clipped,
            {"max_mahalanobis": float(dist.max()), "sigma_after_tell": after},
            client_stats(updates, start, weights, kept),
        )

    def _told_points(self, updates: list[ClientUpdate], kept: np.ndarray) -> list[np.ndarray]:
        """The points told for the client means: the means themselves; pycma clips them (``check_points``)."""
        return [np.asarray(u.mean, dtype=np.float64) for u in updates]

    def _weights(self, updates: list[ClientUpdate], fit: np.ndarray) -> np.ndarray:
        """The weight each client mean gets in the new mean (pycma's rank weights on the told fitnesses)."""
        return rank_weights(fit, list(self.es.sp.weights.positive_weights))[: len(updates)]

    def _sent(self, updates: list[ClientUpdate], after: float, before: float) -> float:
        return sigma_sent(self.sigma_rule, after, before, self.sent_sigma)

    def state_dict(self) -> dict:
        """What a resumed server needs: its CMA-ES (:mod:`fedbpt.core.algorithm.cma_state`, under ``es``) and the step
        sent on, the one step that carries over between rounds."""
        return {**es_state_dict(self.es, "es"), "sent_sigma": float(self.sent_sigma)}

    @classmethod
    def check_state(cls, state: dict, d: int, k: int) -> None:
        """Raise StateError for the first field of ``state`` a server in dimension ``d`` telling ``k`` points a round
        could not continue from. A class method, so that a saved state is checked before any server exists."""
        check_es_state(state, "es", d, k)
        number(member(state, "sent_sigma"), "sent_sigma", positive=True, hi=SIGMA_MAX)

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s output; every field is checked before the server changes."""
        self.check_state(state, self.d, self.k)
        set_es_state(self.es, state, "es")
        self.sent_sigma = float(state["sent_sigma"])


class RobustServerES(ServerES):
    """FedBPT's server CMA-ES with three rules changed; the local search, the wire and Eq. 6 stay the paper's.

    1. Weights by shard size. pycma's default recombination weights decrease with the rank of the uploaded local
       fitness. A client whose few examples are (nearly) one class reaches near-zero loss with a prompt that
       predicts that class for everything, so the most skewed client ranks first and pulls the global prompt its way
       every round (measured: docs/algorithm.md). Here client k's mean weighs n_k / sum n, its share of the pooled
       training loss, as in FedAvg; fitness plays no part. pycma's weights are fixed per rank, so the ES recombines
       K + 1 points with weights 1/K, ..., 1/K, 0 and is told each client's move, clipped as the faithful server
       clips it, scaled by K n_k / sum n (:func:`weighted_told_points`) and, last with weight 0, the current mean.
    2. The sent step is the median of the clients' final local steps (:func:`median_local_step`), not the
       faithful ratio x previous sent step, which the server's CSA at popsize K in d = 500 keeps within about 1%
       of 1 a round, so the clients keep searching at about sigma0 and walk away from what they found.
    3. The server keeps the best mean so far (the incumbent). Every upload carries the site's training loss at the
       mean it received; pooled over the sites, that is the federated objective at the mean the server sent. A
       round whose sent mean is worse than the incumbent (:func:`improves_on`) was searched from a worse point:
       its client means are replaced by the incumbent, so the next round searches from it again, with the next
       (smaller) median local step. Under strong label skew the averaged local moves drift the global prompt
       away from a good one (every method, FedAvg-BBT too); this stops the drift at no extra query or byte.
    """

    check_points = False  # the moves are clipped in _told_points, before the weights scale them

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds_done = 0  # aggregations so far: the round whose sent mean the next uploads evaluated
        self.incumbent: np.ndarray | None = None  # the best sent mean so far by the pooled training loss
        self.incumbent_round: int | None = None
        self.incumbent_losses: dict[str, tuple[float, int]] = {}  # site -> (training loss, n_train) there
        self._restore = False  # this round's uploads searched from a mean worse than the incumbent

    def _es_options(self, k: int) -> tuple[int, dict]:
        return k + 1, {"CMA_mu": k + 1, "CMA_recombination_weights": [1.0] * k + [0.0]}

    def aggregate(self, updates: list[ClientUpdate]) -> AggregationInfo:
        losses = {u.site: (float(u.start_loss), int(u.n_train)) for u in updates if u.start_loss is not None}
        sent = np.array(self.es.mean, dtype=np.float64)
        # after a round that went back, the sent mean is the incumbent (to pycma's rounding): it is taken as it is,
        # since a re-evaluation that differs in the last digits must not send the federation back again and again
        again = self._restore
        self._restore = self.incumbent is not None and not again and not improves_on(losses, self.incumbent_losses)
        if not self._restore:
            self.incumbent, self.incumbent_round, self.incumbent_losses = sent, self.rounds_done, losses
        info = super().aggregate(updates)
        info.notes["restored_to"] = self.incumbent_round if self._restore else None
        self.rounds_done += 1
        return info

    def _told_points(self, updates: list[ClientUpdate], kept: np.ndarray) -> list[np.ndarray]:
        mean = np.array(self.es.mean, dtype=np.float64)
        if self._restore:  # every answer moved from a worse mean: the moves add up to the way back to the incumbent
            n = len(updates)
            return weighted_told_points(mean, [self.incumbent] * n, np.full(n, 1.0 / n), self.k - 1)
        clipped = [mean + f * (np.asarray(u.mean, dtype=np.float64) - mean) for u, f in zip(updates, kept)]
        return weighted_told_points(mean, clipped, shard_weights(updates), self.k - 1)

    def _weights(self, updates: list[ClientUpdate], fit: np.ndarray) -> np.ndarray:
        return np.zeros(len(updates)) if self._restore else shard_weights(updates)

    def _sent(self, updates: list[ClientUpdate], after: float, before: float) -> float:
        return median_local_step(updates)

    def state_dict(self) -> dict:
        """The faithful server's state and the incumbent: its numbers under ``incumbent``, its mean (when there is
        one) under ``incumbent.incumbent``, so a resumed run goes back to the same mean."""
        state = super().state_dict()
        state["incumbent"] = {
            "rounds_done": self.rounds_done,
            "round": self.incumbent_round,
            "losses": {s: [loss, n] for s, (loss, n) in sorted(self.incumbent_losses.items())},
            "went_back": self._restore,
        }
        if self.incumbent is not None:
            state["incumbent.incumbent"] = self.incumbent.copy()
        return state

    @classmethod
    def check_state(cls, state: dict, d: int, k: int) -> None:
        """The faithful server's checks, then the incumbent's when the state has one."""
        super().check_state(state, d, k)
        if "incumbent" in state:
            _incumbent_from(state, d)

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s output. A state without incumbent fields starts keeping an incumbent
        from here, its rounds counted by the tells of its CMA-ES."""
        super().load_state_dict(state)  # checks every field, the incumbent's too, before anything changes
        if "incumbent" in state:
            incumbent = _incumbent_from(state, self.d)
        else:
            incumbent = (int(self.es.countiter), None, {}, None, False)  # one tell per aggregation
        self.rounds_done, self.incumbent_round, self.incumbent_losses, self.incumbent, self._restore = incumbent


def _incumbent_from(state: dict, d: int) -> tuple:
    """(rounds_done, round, losses, mean, went_back) from :meth:`RobustServerES.state_dict`'s incumbent fields;
    StateError ``incumbent`` naming the part that does not fit."""

    def unfit(problem: str) -> StateError:
        return StateError("incumbent", f"does not fit: {problem}")

    numbers = state["incumbent"]
    if not isinstance(numbers, dict):
        raise unfit(f"incumbent is {type(numbers).__name__}, not a map")
    rounds_done, rnd, losses = numbers.get("rounds_done"), numbers.get("round"), numbers.get("losses")
    went_back = numbers.get("went_back", False)
    if not isinstance(went_back, bool):
        raise unfit(f"incumbent.went_back is {went_back!r}, not true or false")
    if isinstance(rounds_done, bool) or not isinstance(rounds_done, int) or rounds_done < 0:
        raise unfit(f"incumbent.rounds_done is {rounds_done!r}, not a round count")
    if not isinstance(losses, dict):
        raise unfit(f"incumbent.losses is {type(losses).__name__}, not a site -> [loss, n] map")
    parsed = {}
    for site, v in losses.items():
        ok = isinstance(v, list) and len(v) == 2 and isinstance(v[1], int) and not isinstance(v[1], bool)
        if not ok or isinstance(v[0], bool) or not isinstance(v[0], (int, float)) or not np.isfinite(v[0]):
            raise unfit(f"incumbent.losses[{site!r}] is {v!r}, not [finite loss, n_train]")
        parsed[str(site)] = (float(v[0]), int(v[1]))
    if rnd is None:
        if "incumbent.incumbent" in state or parsed or went_back:
            raise unfit("incumbent.round is null, yet an incumbent is stored")
        return rounds_done, None, parsed, None, False
    if isinstance(rnd, bool) or not isinstance(rnd, int) or not 0 <= rnd < rounds_done:
        raise unfit(f"incumbent.round is {rnd!r}, not a round before {rounds_done}")
    mean = np.asarray(state.get("incumbent.incumbent", np.empty(0)), dtype=np.float64)
    if mean.shape != (d,) or not np.all(np.isfinite(mean)):
        raise unfit(f"the incumbent mean is missing, not finite or not of shape ({d},)")
    return rounds_done, rnd, parsed, mean.copy(), went_back

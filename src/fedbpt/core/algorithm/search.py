"""Client-side local search: a short CMA-ES run started from the global state, with input perturbation.

Local objective (paper Eq. 7): F(z) = L(z; clean shard) / L(z; perturbed shard). A prompt that helps only by
exploiting surface features of this client's few examples keeps a low loss on the perturbed copy too, so the
ratio rewards prompts whose gain depends on the actual text.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedbpt.core.models.scorer import Encoded, example_losses, loss_and_metrics

EPS = 1e-12
EQ7_FORMS = ("mean_ratio", "per_example")  # --eq7: mean_ratio as the reference, per_example as the paper writes it
STEP_ADAPTATIONS = ("csa", "tpa")  # --local_adaptation: pycma step-size adaptation classes (adaptation_class)


@dataclass
class GlobalState:
    """What a client needs to start its local search. ``cov`` is a full matrix, a diagonal vector, or None."""

    round: int
    mean: np.ndarray
    sigma: float
    cov: np.ndarray | None = None


@dataclass
class LocalResult:
    mean: np.ndarray
    fitness: float
    sigmas: np.ndarray  # the step each iteration sampled with: sigmas[0] is the received step
    popsize: int
    evaluations: int
    sigma_final: float  # the step after the last tell


def derive_seed(*parts: int) -> int:
    """A positive 31-bit seed from (seed, site, round, ...): pycma treats seed 0 as 'seed from the clock'."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] % (2**31 - 2)) + 1


def perturb(enc: Encoded, rate: float, vocab_ids: np.ndarray, rng: np.random.Generator) -> Encoded:
    """Replace each ordinary text token, with probability ``rate``, by a uniform draw from ``vocab_ids``.

    Special tokens, the mask and the prompt placeholders are never touched (``text_mask`` excludes them);
    lengths are unchanged, so the mask position and labels stay valid.
    """
    new_ids = []
    for x, m in zip(enc.ids, enc.text_mask):
        hit = m & (rng.random(len(x)) < rate)
        y = x.copy()
        y[hit] = rng.choice(vocab_ids, size=int(hit.sum()))
        new_ids.append(y)
    return enc.with_ids(new_ids)


def eq7_fitness(clean_loss: np.ndarray, perturbed_loss: np.ndarray, form: str = "mean_ratio") -> np.ndarray:
    """Eq. 7 (lower is better) from per-example losses (C, N) of the clean and the perturbed copy.

    mean_ratio (the reference): mean clean loss / mean perturbed loss. per_example (the paper's formula): the mean
    over examples of clean_i / perturbed_i; the mean, not the sum, so that fitnesses of shards of different sizes
    compare (CMA-ES and the S' ranking see only the order within a client). Divisors are floored at 1e-12.
    """
    clean = np.atleast_2d(np.asarray(clean_loss, dtype=np.float64))
    pert = np.atleast_2d(np.asarray(perturbed_loss, dtype=np.float64))
    if form == "mean_ratio":
        return clean.mean(-1) / np.maximum(pert.mean(-1), EPS)
    if form == "per_example":
        return (clean / np.maximum(pert, EPS)).mean(-1)
    raise ValueError(f"unknown Eq. 7 form {form!r}: mean_ratio or per_example")


def concat(a: Encoded, b: Encoded) -> Encoded:
    return Encoded(
        a.ids + b.ids,
        a.text_mask + b.text_mask,
        np.concatenate([a.mask_pos, b.mask_pos]),
        np.concatenate([a.labels, b.labels]),
    )


class LocalObjective:
    """F for a generation of candidates; clean and perturbed shards are scored in the same forward passes."""

    def __init__(
        self,
        logits_fn: Callable[[np.ndarray, Encoded], np.ndarray],
        clean: Encoded,
        loss_type: str,
        perturbed: Encoded | None = None,
        eq7: str = "mean_ratio",
    ) -> None:
        self.logits_fn = logits_fn
        self.loss_type = loss_type
        self.eq7 = eq7
        self.n = len(clean)
        self.perturbed = perturbed is not None
        self.inputs = concat(clean, perturbed) if perturbed is not None else clean
        self.evaluations = 0

    def __call__(self, z: np.ndarray) -> np.ndarray:
        z = np.atleast_2d(z)
        self.evaluations += len(z)
        logits = self.logits_fn(z, self.inputs)
        if not self.perturbed:
            return loss_and_metrics(logits, self.inputs.labels, self.loss_type)[0]
        losses = example_losses(logits, self.inputs.labels, self.loss_type)
        return eq7_fitness(losses[:, : self.n], losses[:, self.n :], self.eq7)


_EIGH_CACHE: OrderedDict[bytes, tuple[np.ndarray, np.ndarray]] = OrderedDict()


def cached_eigh(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy's eigh, memoised on the matrix's bytes (pycma's CMA_eigenmethod).

    Every client of a round starts from the same global C; when several sites share a process (the simulator
    with --threads < --num_clients, in-process runs) the O(d^3) decomposition (33 ms at d = 500) is done once.
    The result is bit-identical to a fresh call; copies are returned because pycma rescales them in place.
    """
    key = hashlib.sha256(np.ascontiguousarray(c).tobytes()).digest() + str(c.shape).encode()
    if key not in _EIGH_CACHE:
        _EIGH_CACHE[key] = np.linalg.eigh(c)
        while len(_EIGH_CACHE) > 4:
            _EIGH_CACHE.popitem(last=False)
    w, v = _EIGH_CACHE[key]
    return w.copy(), v.copy()


def set_covariance(es, cov: np.ndarray | None) -> None:
    """Give a fresh pycma ES the global covariance (full matrix or diagonal); None keeps the identity."""
    if cov is None:
        return
    c = np.diag(cov) if cov.ndim == 1 else cov
    es.sm.C = np.array(c, dtype=np.float64)
    es.sm.update_now(-1)  # recompute B and D from C, as pycma's own _set_C_from does
    es._updateBDfromSM()


def adaptation_class(name: str):
    """pycma's step-size adaptation class: csa (cma 3.4's default, which the reference pinned) or tpa (what cma 4.x
    picks on its own at d >= its threshold). Always passed explicitly, so a pycma upgrade cannot change it."""
    import cma

    classes = {"csa": cma.sigma_adaptation.CMAAdaptSigmaCSA, "tpa": cma.sigma_adaptation.CMAAdaptSigmaTPA}
    if name not in classes:
        raise ValueError(f"unknown step-size adaptation {name!r}: csa or tpa")
    return classes[name]


def make_es(
    mean: np.ndarray,
    sigma: float,
    popsize: int,
    seed: int,
    bound: float,
    extra: dict | None = None,
    adaptation: str = "csa",
):
    import cma

    opts = {
        "popsize": popsize,
        "seed": seed,
        "verbose": -9,
        "CMA_diagonal": False,
        "AdaptSigma": adaptation_class(adaptation),
    }
    if bound > 0:
        opts["bounds"] = [-bound, bound]
    opts.update(extra or {})
    return cma.CMAEvolutionStrategy(np.asarray(mean, dtype=np.float64), float(sigma), opts)


def local_search(
    state: GlobalState,
    objective: Callable[[np.ndarray], np.ndarray],
    popsize: int,
    iterations: int,
    seed: int,
    bound: float = 0.0,
    should_stop: Callable[[], bool] | None = None,
    adaptation: str = "csa",
) -> LocalResult:
    """I iterations of CMA-ES from (m_t, sigma_t, C_t); returns the final mean, F(mean) and the I step sizes.

    The step sizes are recorded as the reference records them: the step each iteration samples with (read before
    ask), so the list starts with the received sigma_t and leaves out the step after the last tell.
    pycma draws from numpy's global generator, seeded here from ``seed`` (derived from seed, site and round):
    each client samples its own candidates, and a rerun samples the same ones.
    """
    from threadpoolctl import threadpool_limits

    # One BLAS thread for pycma's small linear algebra (no oversubscription next to the scorer's threads).
    # Only the BLAS API: a bare threadpool_limits(1) also sets OpenMP to one thread, and torch's CPU kernels
    # run on OpenMP, so the objective's forward passes would lose all but one core.
    with threadpool_limits(1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pycma's notes about flat fitness or small populations
        es = make_es(state.mean, state.sigma, popsize, seed, bound, {"CMA_eigenmethod": cached_eigh}, adaptation)
        set_covariance(es, state.cov)
        sigmas = []
        evaluations = 0
        for _ in range(iterations):
            if should_stop is not None and should_stop():
                raise InterruptedError("local search aborted")
            sigmas.append(float(es.sigma))
            x = es.ask()
            f = objective(np.asarray(x))
            evaluations += len(x)
            es.tell(x, [float(v) for v in f])
        mean = np.asarray(es.result.xfavorite, dtype=np.float64)
        sigma_final = float(es.sigma)
    fitness = float(objective(mean[None])[0])
    return LocalResult(mean, fitness, np.asarray(sigmas, dtype=np.float64), popsize, evaluations + 1, sigma_final)


def evaluate(logits_fn: Callable, z: np.ndarray, enc: Encoded, loss_type: str) -> dict:
    """Loss and confusion matrix of a prompt (d,) on one encoded set (dev, test, the global train fit).

    Several prompts (K, d) give the summed confusion matrix and the mean loss, so the pooled accuracy is the
    mean over the K prompts of each one's accuracy (local-only runs evaluate every site's prompt this way).
    """
    z = np.atleast_2d(z)
    loss, conf = loss_and_metrics(logits_fn(z, enc), enc.labels, loss_type)
    return {"loss": float(loss.mean()), "n": len(enc) * len(z), "confusion": conf.sum(0)}

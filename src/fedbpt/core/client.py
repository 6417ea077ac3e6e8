"""One site's FedBPT work, free of NVFlare: data shard, scorer, local search, evaluation.

The NVFlare executor is a thin wrapper around :class:`SiteRuntime`. A runtime is cached per process and keyed
by (config, site): the simulator recreates executors between tasks when it runs fewer threads than clients, and
everything here can be rebuilt from the config and the site name alone.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

from fedbpt.core.config import prompt_placement, scorer_options
from fedbpt.core.data import load_split
from fedbpt.core.models import TINY_NAME, model_kind, resolve_model
from fedbpt.core.search import LocalObjective, derive_seed, evaluate, local_search, perturb
from fedbpt.core.site import pick_device, site_settings
from fedbpt.core.tasks import get_task
from fedbpt.core.wire import encode_update, state_for_site
from fedbpt.errors import ConfigError

log = logging.getLogger(__name__)
_RUNTIMES: dict[tuple, SiteRuntime] = {}


def build_scorer(cfg: dict, model_path: str, task, device: str):
    """The scorer for the model's kind (masked: scorer.Scorer; causal: causal.CausalScorer), "auto" options resolved."""
    kind = model_kind(model_path)
    if kind == "causal":
        from fedbpt.core.causal import CausalScorer as cls
    else:
        from fedbpt.core.scorer import Scorer as cls
    opts = scorer_options(cfg, kind)
    return cls(
        model_path,
        task,
        cfg["n_prompt_tokens"],
        cfg["intrinsic_dim"],
        opts["cat_or_add"],
        cfg["seed"],
        cfg["sigma"],
        device,
        cfg["precision"],
        cfg["max_batch_tokens"],
        cfg["attn_implementation"],
        label_encoding=opts["label_encoding"],
        prompt_placement=prompt_placement(cfg),
    )


class SiteRuntime:
    def __init__(self, cfg: dict, site: str, cache_root: str) -> None:
        import torch

        if cfg["model_name"] == TINY_NAME:  # a research model: built before the run, named by its folder
            raise ConfigError("model tiny-random is not built: pass the config through core.preflight.prepare_config")
        self.cfg, self.site = cfg, site
        self.task = get_task(cfg["task_name"])
        if cfg.get("torch_threads"):
            torch.set_num_threads(int(cfg["torch_threads"]))
        self.local = site_settings(cfg, site, os.path.join(cache_root, "local"))  # the site's own data settings
        self.index = self.local.seed_index
        t0 = time.time()
        data_dir = self.local.data_dir
        full_train = load_split(self.task, "train", data_dir)
        data = self.local.shards(self.task, cfg, full_train)
        model_path = resolve_model(cfg["model_name"])
        device = pick_device(cfg["device"])
        self.scorer = build_scorer(cfg, model_path, self.task, device)
        self.train = self.scorer.encode(data.train)
        self.dev = self.scorer.encode(data.dev)
        self.is_eval_client = site in cfg["eval_clients"].split(",")
        self.test_examples = load_split(self.task, self.task.test_split, data_dir) if self.is_eval_client else None
        self.test = self.scorer.encode(self.test_examples) if self.is_eval_client else None
        # after the input: the clean shards' text keys/values, computed once and kept for the run (bounded)
        held = self.scorer.hold(self.train) + self.scorer.hold(self.dev)
        log.info(
            "%s: %d train, %d dev, %s test examples (data %s, shard %s; %s); model %s on %s "
            "(CUDA_VISIBLE_DEVICES=%s); prompt %s, text keys/values kept %.3g MB; ready in %.1fs",
            site,
            len(self.train),
            len(self.dev),
            len(self.test) if self.test is not None else "no",
            self.local.data_dir or "hub",
            "own" if self.local.shard is None else self.local.shard + 1,
            self.local.source,
            model_path,
            device,
            os.environ.get("CUDA_VISIBLE_DEVICES"),
            self.scorer.placement,
            held / 2**20,
            time.time() - t0,
        )

    @classmethod
    def get(cls, cfg: dict, site: str, cache_root: str) -> SiteRuntime:
        key = (json.dumps(cfg, sort_keys=True), site)
        if key not in _RUNTIMES:
            for old in _RUNTIMES.values():  # one site per process at a time: free the previous one
                old.scorer.close()
            _RUNTIMES.clear()
            _RUNTIMES[key] = cls(cfg, site, cache_root)
        return _RUNTIMES[key]

    def _eval(self, z: np.ndarray, name: str, enc, out: dict) -> None:
        r = evaluate(self.scorer.label_logits, z, enc, self.cfg["loss_type"])
        out[f"{name}_loss"], out[f"{name}_n"], out[f"{name}_confusion"] = r["loss"], r["n"], r["confusion"]
        out["eval_queries"] = out.get("eval_queries", 0) + r["n"]

    def evaluate(self, z: np.ndarray, with_dev: bool, with_test: bool = True) -> dict:
        """The global prompt (or every site's prompt, local-only) on this site's train shard, and (when due) its
        dev shard and, on eval clients, the test set."""
        out: dict = {}
        self._eval(z, "train", self.train, out)
        if with_dev:
            self._eval(z, "dev", self.dev, out)
            if with_test and self.test is not None:
                self._eval(z, "test", self.test, out)
        return out

    def final_evaluate(self, msg: dict) -> dict:
        """The final prompt on train, dev and test; on the test set also the best-dev prompt (--test_eval end) and
        the template alone with no prompt rows (what tuning is measured against), from one pass where the
        placement allows."""
        final = np.asarray(msg["state"]["mean"], dtype=np.float64)
        tokens = self.scorer.tokens
        out = self.evaluate(final, with_dev=True, with_test=False)
        if self.test is not None:
            zs = [final]
            best = np.asarray(msg["best_mean"], dtype=np.float64) if "best_mean" in msg else None
            if best is not None and not np.array_equal(best, final):
                zs.append(best)
            logits, bare = self.scorer.label_logits_with_bare(np.stack(zs), self.test)
            if bare is None:
                bare = self._bare_logits(self.test_examples)
            loss_type = self.cfg["loss_type"]
            named = [("test", logits[0])] + ([("best_test", logits[-1])] if best is not None else [])
            for name, lg in named + [("no_prompt_test", bare)]:
                r = evaluate(lambda z, enc, lg=lg: lg[None], final, self.test, loss_type)
                out[f"{name}_loss"], out[f"{name}_n"], out[f"{name}_confusion"] = r["loss"], r["n"], r["confusion"]
            out["eval_queries"] = out.get("eval_queries", 0) + len(self.test) * (len(zs) + 1)
        out["tokens"] = self.scorer.tokens - tokens
        return out

    def _bare_logits(self, examples) -> np.ndarray:
        """The test set's label logits from the template alone (a scorer with no prompt tokens on the same model)."""
        cfg = dict(self.cfg, n_prompt_tokens=0)
        bare = build_scorer(cfg, resolve_model(cfg["model_name"]), self.task, str(self.scorer.device))
        try:
            enc = bare.encode(examples)
            logits = bare.label_logits(np.zeros(cfg["intrinsic_dim"]), enc)[0]
            self.scorer.tokens += bare.tokens
        finally:
            bare.close()
        return logits

    def run_round(self, state_msg: dict, with_eval: bool, should_stop=None) -> dict:
        """Evaluate the received global mean, then run the local search; returns the upload."""
        cfg = self.cfg
        shown, state = state_for_site(state_msg, self.site)
        t0 = time.time()
        tokens = self.scorer.tokens
        metrics = self.evaluate(shown, with_eval, with_test=cfg["test_eval"] == "rounds")
        t_eval = time.time() - t0
        perturbed = None
        if cfg["perturb"]:
            rng = np.random.default_rng([cfg["seed"], self.index, state.round, 1])
            perturbed = perturb(self.train, cfg["perturb_rate"], self.scorer.ordinary_ids, rng)
            self.scorer.hold(perturbed)  # after the input: the perturbed texts' keys/values, for this round
        objective = LocalObjective(self.scorer.label_logits, self.train, cfg["loss_type"], perturbed, cfg["eq7"])
        seed = derive_seed(cfg["seed"], self.index, state.round)
        try:
            res = local_search(
                state,
                objective,
                cfg["local_popsize"],
                cfg["local_iter"],
                seed,
                cfg["bound"],
                should_stop,
                cfg["local_adaptation"],
            )
        finally:
            if perturbed is not None:
                self.scorer.release(perturbed)
        metrics["queries"] = objective.evaluations * len(objective.inputs)  # examples x candidates, both copies
        metrics["tokens"] = self.scorer.tokens - tokens
        return encode_update(
            res.mean,
            res.fitness,
            res.sigmas,
            res.popsize,
            len(self.train),
            res.sigma_final,
            seconds_search=time.time() - t0 - t_eval,
            seconds_eval=t_eval,
            **metrics,
        )


class RuntimePool:
    """All sites' runtimes in one process (in-process runs and benchmarks); they share the cached model."""

    def __init__(self, cfg: dict, cache_root: str) -> None:
        self.cfg, self.cache_root = cfg, cache_root
        self.runtimes: dict[str, SiteRuntime] = {}

    def __call__(self, site: str) -> SiteRuntime:
        if site not in self.runtimes:
            self.runtimes[site] = SiteRuntime(self.cfg, site, self.cache_root)
        return self.runtimes[site]

    def close(self) -> None:
        for runtime in self.runtimes.values():
            runtime.scorer.close()
        self.runtimes.clear()

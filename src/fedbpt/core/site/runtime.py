"""One site's FedBPT work, free of NVFlare: data shard, scorer, local search, evaluation.

The NVFlare executor is a thin wrapper around :class:`SiteRuntime`. A runtime is cached per process and keyed
by (config, site): the simulator recreates executors between tasks when it runs fewer threads than clients, and
everything here can be rebuilt from the config and the site name alone. With fewer threads than clients it also
runs every task in a fresh process; what the site derived is then read back from its set-up cache on disk
(core.site.cache) instead of being rebuilt.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

import numpy as np

from fedbpt.core.algorithm.search import LocalObjective, derive_seed, evaluate, local_search, perturb
from fedbpt.core.data.splits import load_split
from fedbpt.core.data.tasks import get_task
from fedbpt.core.models.resolve import TINY_NAME, model_kind, resolve_model
from fedbpt.core.site.cache import Entry, SetupCache
from fedbpt.core.site.settings import pick_device, site_settings
from fedbpt.core.wire import PRIVATE_SPLITS, encode_update, state_for_site
from fedbpt.errors import ConfigError

if TYPE_CHECKING:
    from fedbpt.core.config import RunConfig

log = logging.getLogger(__name__)
_RUNTIMES: dict[tuple, SiteRuntime] = {}


def build_scorer(cfg: RunConfig, model_path: str, task, device: str, cached_projection: tuple | None = None):
    """The scorer for the model's kind (masked: scorer.Scorer; causal: causal.CausalScorer), "auto" options resolved;
    ``cached_projection``: (A^T, std) from the site's set-up cache."""
    kind = model_kind(model_path)
    if kind == "causal":
        from fedbpt.core.models.causal import CausalScorer as cls
    else:
        from fedbpt.core.models.scorer import Scorer as cls
    opts = cfg.scorer_options(kind)
    return cls(
        model_path,
        task,
        cfg.n_prompt_tokens,
        cfg.intrinsic_dim,
        opts["cat_or_add"],
        cfg.seed,
        cfg.sigma,
        device,
        cfg.precision,
        cfg.max_batch_tokens,
        cfg.attn_implementation,
        label_encoding=opts["label_encoding"],
        prompt_placement=cfg.placement,
        cached_projection=cached_projection,
    )


def _model_type(model_path: str) -> str | None:
    """The model_type in a local folder's config.json (None for a hub id or an unreadable config)."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            value = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def import_libraries(model_path: str) -> float:
    """Start the libraries in this process: import torch, transformers and the model's own module, and build
    transformers' table of checkpoint conversions (about 1,000 regular expressions for every model type, compiled on
    a process's first ``from_pretrained``). Returns the seconds it took, about 0 when the process has them. A fresh
    client process pays this whatever is cached, so it is reported apart from the set-up (``import_seconds``)."""
    t0 = time.perf_counter()
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer  # noqa: F401

    model_type = _model_type(model_path)
    if model_type:
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping
            from transformers.models.auto.configuration_auto import model_type_to_module_name

            module = model_type_to_module_name(model_type)
            importlib.import_module(f"transformers.models.{module}.modeling_{module}")
            get_checkpoint_conversion_mapping(model_type)
        except ImportError:  # another transformers layout: from_pretrained does it (counted as set-up)
            pass
    return time.perf_counter() - t0


def go_hub_offline() -> None:
    """Run this process with the Hugging Face hub offline (HF_HUB_OFFLINE=1): every file it needs is local, so a
    respawned client makes no DNS lookups or HTTP checks. Set before transformers loads; if huggingface_hub is already
    imported its flag is set as well (it reads the variable once, at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


@contextlib.contextmanager
def torch_threads(n: int):
    """Within the block torch runs ``n`` threads (0: unchanged): the final test pass runs when the other sites are done
    with their work, so on a shared CPU it may take the cores they held."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SiteRuntime:
    """What a site builds before it can work: its data shard and encodings, the test set on eval sites, tokenizer,
    model and projection A; for causal LMs the held text keys/values.

    ``setup_cache``: read what the site derives from (config, site) from its set-up cache under ``cache_root``
    (core.site.cache), writing it on the first set-up, so a respawned client process reloads it instead of
    rebuilding it. ``hub_offline``: once the cache holds an entry (every file resolved locally), run the process
    hub-offline. ``setup_seconds`` (building) and ``import_seconds`` (library imports this process had to do) are
    reported once, by the first task that takes them (:meth:`take_setup_seconds`). ``cache_state``: read, written,
    not written (the disk refused) or off.
    """

    def __init__(
        self, cfg: RunConfig, site: str, cache_root: str, setup_cache: bool = False, hub_offline: bool = False
    ) -> None:
        t0 = time.perf_counter()
        if cfg.model_name == TINY_NAME:  # a research model: built before the run, named by its folder
            raise ConfigError("model tiny-random is not built: pass the config through flare.preflight.prepare_config")
        self.cfg, self.site = cfg, site
        self.task = get_task(cfg.task_name)
        self.local = site_settings(cfg, site, os.path.join(cache_root, "local"))  # the site's own data settings
        self.index = self.local.seed_index
        self.is_eval_client = site in cfg.eval_sites
        name = resolve_model(cfg.model_name)
        store = SetupCache(cache_root, site) if setup_cache else None
        model_path = (store.local_model(name) if store else None) or name
        self.model_path = model_path  # what this runtime loaded (a hub id may resolve to a local snapshot)
        local_files = store is not None and os.path.isdir(model_path)  # a folder, or the one a hub id resolved to
        key = store.key(cfg, self.local, self.is_eval_client, model_path, self.task) if local_files else None
        entry = store.read(key) if key is not None else None
        if entry is not None and hub_offline:
            go_hub_offline()
        self.import_seconds = import_libraries(model_path)
        import torch

        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        device = pick_device(cfg.device)
        if entry is not None:
            self.scorer = build_scorer(cfg, model_path, self.task, device, (entry.a_t, entry.proj_std))
            self.train, self.dev, self.test = entry.train, entry.dev, entry.test
            self.test_examples = entry.test_examples
            self.cache_state = "read"
        else:
            data_dir = self.local.data_dir
            full_train = load_split(self.task, "train", data_dir)
            data = self.local.shards(self.task, cfg, full_train)
            self.scorer = build_scorer(cfg, model_path, self.task, device)
            self.train = self.scorer.encode(data.train)
            self.dev = self.scorer.encode(data.dev)
            split = self.task.test_split
            self.test_examples = load_split(self.task, split, data_dir) if self.is_eval_client else None
            self.test = self.scorer.encode(self.test_examples) if self.is_eval_client else None
            self.cache_state = "off"
            if store is not None:
                folder = store.record_model(name) if key is None else model_path
                if folder is not None:
                    key = key or store.key(cfg, self.local, self.is_eval_client, folder, self.task)
                    a_t = self.scorer.A_t.detach().cpu().numpy()
                    entry = Entry(self.train, self.dev, self.test, self.test_examples, a_t, self.scorer.proj_std)
                    self.cache_state = "written" if store.write(key, entry) else "not written"
        # after the input: the clean shards' text keys/values, computed once and kept for the run (bounded)
        held = self.scorer.hold(self.train) + self.scorer.hold(self.dev)
        self.setup_seconds = time.perf_counter() - t0 - self.import_seconds
        self._pending = {"setup_seconds": self.setup_seconds, "import_seconds": self.import_seconds}
        log.info(
            "%s: %d train, %d dev, %s test examples (data %s, shard %s; %s); model %s on %s "
            "(CUDA_VISIBLE_DEVICES=%s); prompt %s, text keys/values kept %.3g MB; set-up cache %s; ready in %.1fs "
            "(+%.1fs imports)",
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
            self.cache_state,
            self.setup_seconds,
            self.import_seconds,
        )

    def take_setup_seconds(self) -> dict:
        """``setup_seconds`` and ``import_seconds`` for the first task that asks (what it spent building this
        runtime); 0 for every later task, which reuses it."""
        out, self._pending = self._pending, {"setup_seconds": 0.0, "import_seconds": 0.0}
        return out

    @classmethod
    def get(cls, cfg: RunConfig, site: str, cache_root: str, **options) -> SiteRuntime:
        """The process's runtime for (config, site), built on first use (``options``: see the class)."""
        key = (cfg.model_dump_json(), site)
        if key not in _RUNTIMES:
            for old in _RUNTIMES.values():  # one site per process at a time: free the previous one
                old.scorer.close()
            _RUNTIMES.clear()
            _RUNTIMES[key] = cls(cfg, site, cache_root, **options)
        return _RUNTIMES[key]

    def _eval(self, z: np.ndarray, name: str, enc, out: dict, logits_fn=None) -> int:
        """Report ``name``'s loss, count and (this site's own train/dev data, --site_metrics pooled) correct count or
        confusion matrix into ``out``; returns the examples x prompts scored."""
        r = evaluate(logits_fn or self.scorer.label_logits, z, enc, self.cfg.loss_type)
        out[f"{name}_loss"], out[f"{name}_n"] = r["loss"], r["n"]
        if name in PRIVATE_SPLITS and self.cfg.site_metrics == "pooled":
            out[f"{name}_correct"] = int(np.trace(r["confusion"]))  # its rows would be the site's label histogram
        else:
            out[f"{name}_confusion"] = r["confusion"]
        return r["n"]

    def evaluate(self, z: np.ndarray, with_dev: bool, with_test: bool = True) -> dict:
        """The global prompt (or every site's prompt, local-only) on this site's train shard, and (when due) its
        dev shard and, on eval clients, the test set."""
        out: dict = {}
        out["eval_queries"] = self._eval(z, "train", self.train, out)
        if with_dev:
            out["eval_queries"] += self._eval(z, "dev", self.dev, out)
            if with_test and self.test is not None:
                out["eval_queries"] += self._eval(z, "test", self.test, out)
        return out

    def final_evaluate(self, msg: dict) -> dict:
        """The final prompt on train, dev and test; on the test set also the best-dev prompt (--test_eval end) and
        the template alone with no prompt rows (what tuning is measured against), from one pass over the texts where
        the placement allows."""
        final = np.asarray(msg["state"]["mean"], dtype=np.float64)
        tokens = self.scorer.tokens
        out = self.evaluate(final, with_dev=True, with_test=False)
        if self.test is not None:
            best = np.asarray(msg["best_mean"], dtype=np.float64) if "best_mean" in msg else None
            zs = [final] if best is None or np.array_equal(best, final) else [final, best]  # scored once each
            with torch_threads(self.cfg.test_threads):
                logits, bare = self.scorer.label_logits_with_bare(np.stack(zs), self.test)
                if bare is None:
                    bare = self._bare_logits(self.test_examples)
            named = [("test", logits[0])] + ([("best_test", logits[-1])] if best is not None else [])
            for name, lg in named + [("no_prompt_test", bare)]:
                self._eval(final, name, self.test, out, lambda z, enc, lg=lg: lg[None])
            out["eval_queries"] += len(self.test) * (len(zs) + 1)
        out["tokens"] = self.scorer.tokens - tokens
        return out

    def _bare_logits(self, examples) -> np.ndarray:
        """The test set's label logits from the template alone (a scorer with no prompt tokens on the same model)."""
        cfg = self.cfg.model_copy(update={"n_prompt_tokens": 0})
        bare = build_scorer(cfg, self.model_path, self.task, str(self.scorer.device))
        try:
            enc = bare.encode(examples)
            logits = bare.label_logits(np.zeros(cfg.intrinsic_dim), enc)[0]
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
        metrics = self.evaluate(shown, with_eval, with_test=cfg.test_eval == "rounds")
        t_eval = time.time() - t0
        perturbed = None
        if cfg.perturb:
            rng = np.random.default_rng([cfg.seed, self.index, state.round, 1])
            perturbed = perturb(self.train, cfg.perturb_rate, self.scorer.ordinary_ids, rng)
            self.scorer.hold(perturbed)  # after the input: the perturbed texts' keys/values, for this round
        objective = LocalObjective(self.scorer.label_logits, self.train, cfg.loss_type, perturbed, cfg.eq7)
        seed = derive_seed(cfg.seed, self.index, state.round)
        try:
            res = local_search(
                state,
                objective,
                cfg.local_popsize,
                cfg.local_iter,
                seed,
                cfg.bound,
                should_stop,
                cfg.local_adaptation,
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
            **self.take_setup_seconds(),
            **metrics,
        )


class RuntimePool:
    """All sites' runtimes in one process (in-process runs and benchmarks); they share the cached model and A, so a
    set-up cache on disk (``setup_cache``) only helps a later process."""

    def __init__(self, cfg: RunConfig, cache_root: str, setup_cache: bool = False) -> None:
        self.cfg, self.cache_root, self.setup_cache = cfg, cache_root, setup_cache
        self.runtimes: dict[str, SiteRuntime] = {}

    def __call__(self, site: str) -> SiteRuntime:
        if site not in self.runtimes:
            self.runtimes[site] = SiteRuntime(self.cfg, site, self.cache_root, setup_cache=self.setup_cache)
        return self.runtimes[site]

    def close(self) -> None:
        for runtime in self.runtimes.values():
            runtime.scorer.close()
        self.runtimes.clear()

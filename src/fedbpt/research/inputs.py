"""The research inputs a run may name: ``--model_name tiny-random`` and ``--task_name planted``, built before the job
(deterministic, once per model cache) and then named by their folders, so no site needs research code."""

from __future__ import annotations

import os

from fedbpt.core.config import RunConfig
from fedbpt.core.models.resolve import TINY_NAME
from fedbpt.errors import ConfigError, opt
from fedbpt.research.tiny import build_tiny_model, tiny_model_key


def materialize(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its research inputs built and named by path, so no site needs this package's research code.

    ``--model_name tiny-random`` becomes the folder of the tiny model built from the task's training texts;
    ``--task_name planted`` (which needs tiny-random) also points ``data_dir`` at the synthetic task's data. Both
    are deterministic and built once in ``model_cache_dir`` (default: the user's fedbpt model cache). Anything
    else is returned unchanged.
    """
    from fedbpt.core.data.tasks import PLANTED
    from fedbpt.core.models.resolve import model_cache_dir

    cache = cfg.model_cache_dir or model_cache_dir()
    if cfg.task_name == PLANTED:
        from fedbpt.research.planted import ensure_bundle

        if cfg.model_name != TINY_NAME and not _is_bundle(cfg):
            raise ConfigError(f"{opt('task_name')} planted builds its own model: use {opt('model_name')} tiny-random")
        if cfg.model_name == TINY_NAME:
            bundle = ensure_bundle(cfg, cache)
            return cfg.replace(model_name=bundle.model_dir, data_dir=bundle.data_dir)
        return cfg
    if cfg.model_name != TINY_NAME:
        return cfg
    from fedbpt.core.data.splits import load_split
    from fedbpt.core.data.tasks import get_task

    task = get_task(cfg.task_name)
    texts = [" ".join(t) for t in load_split(task, "train", cfg.data_dir).texts]
    key = tiny_model_key(texts, task.label_words, cfg.seed, 2000)
    path = build_tiny_model(os.path.join(cache, f"{TINY_NAME}-{task.name}-{key}"), texts, task.label_words, cfg.seed)
    return cfg.replace(model_name=path)


def _is_bundle(cfg: RunConfig) -> bool:
    """A planted config already materialized: model and data are the two halves of one built bundle."""
    model, data = cfg.model_name, cfg.data_dir or ""
    root = os.path.dirname(os.path.abspath(model))
    return os.path.isfile(os.path.join(root, "meta.json")) and os.path.dirname(os.path.abspath(data)) == root

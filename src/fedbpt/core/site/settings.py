"""Site-local settings for real deployments: where this site's data lives, which shard it takes, which device.

In the simulator every site derives its shard of one public dataset from its name (site-1 is shard 0). In a
deployment each site reads its own files, which the job (written on another machine) cannot know. A site says
where they are, and how to use them, in its own environment or in ``local/fedbpt_site.json`` of its startup kit
(the folder NVFlare keeps for site-local configuration). Environment variables win over the file; both win over
the job's ``--data_dir``.

- ``FEDBPT_DATA_DIR`` / ``"data_dir"``: folder with this site's train (and, on eval sites, test) files.
- ``FEDBPT_SITE_INDEX`` / ``"site_index"``: ``1..num_clients``: the folder holds the shared dataset and this site
  takes shard i of the k-shot sample, exactly as ``site-<i>`` does in the simulator; ``own``: the folder holds
  this site's own data and its k-shot train and dev sets (``--k_shot`` per class each) come from it alone.
  Default: the index in the site's name (``site-3`` -> 3).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedbpt.core.data.splits import SITE_PATTERN, Examples, SiteData, k_shot_indices, site_data, site_index
from fedbpt.core.data.tasks import TaskSpec
from fedbpt.errors import ConfigError, opt

if TYPE_CHECKING:
    from fedbpt.core.config import RunConfig

SITE_FILE = "fedbpt_site.json"
ENV_DATA_DIR = "FEDBPT_DATA_DIR"
ENV_SITE_INDEX = "FEDBPT_SITE_INDEX"
OWN = "own"


@dataclass
class SiteSettings:
    data_dir: str | None
    shard: int | None  # 0-based shard of the shared dataset; None: the site's own data, used whole
    seed_index: int  # feeds this site's seeds (local search, perturbation): distinct per site
    source: str  # where the settings came from, for the log

    def shards(self, task: TaskSpec, cfg: RunConfig, full_train: Examples) -> SiteData:
        """This site's k-shot train and dev examples."""
        if self.shard is None:
            tr, dv = k_shot_indices(full_train.labels, cfg.k_shot, task.num_classes, cfg.seed, cfg.dev_shot)
            return SiteData(full_train.subset(tr), full_train.subset(dv))
        return site_data(
            task,
            self.data_dir,
            cfg.k_shot,
            cfg.num_clients,
            self.shard,
            cfg.iid,
            cfg.alpha_dir,
            cfg.seed,
            full_train=full_train,
            scheme=cfg.partition,
            dev_shot=cfg.dev_shot,
        )


def _name_seed_index(site: str) -> int:
    """A stable per-site number for sites outside the site-<i> scheme (beyond any shard index)."""
    return 1_000_000 + int(hashlib.sha256(site.encode()).hexdigest()[:8], 16)


def read_site_file(config_dir: str | None) -> tuple[dict, str]:
    if not config_dir:
        return {}, ""
    path = os.path.join(config_dir, SITE_FILE)
    if not os.path.isfile(path):
        return {}, ""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"site file {path} is not valid JSON ({exc}): fix or remove it") from None
    unknown = sorted(set(data) - {"data_dir", "site_index"}) if isinstance(data, dict) else None
    if unknown is None or unknown:
        raise ConfigError(f"site file {path} must be a JSON object with keys data_dir, site_index; got {unknown}")
    return data, path


def site_settings(cfg: RunConfig, site: str, config_dir: str | None = None, env: dict | None = None) -> SiteSettings:
    """Resolve this site's data folder and shard: environment, then ``config_dir/fedbpt_site.json``, then the job."""
    env = os.environ if env is None else env
    file_values, file_path = read_site_file(config_dir)
    sources = []
    data_dir = cfg.data_dir
    if "data_dir" in file_values:
        data_dir = file_values["data_dir"]
        sources.append(f"data_dir from {file_path}")
    if env.get(ENV_DATA_DIR):
        data_dir = env[ENV_DATA_DIR]
        sources.append(f"data_dir from ${ENV_DATA_DIR}")
    if data_dir:
        data_dir = os.path.abspath(os.path.expanduser(str(data_dir)))
        if not os.path.isdir(data_dir):
            raise ConfigError(
                f"{site}: data folder {data_dir} does not exist: set ${ENV_DATA_DIR} or data_dir in "
                f"local/{SITE_FILE} to this site's data folder"
            )
    index = file_values.get("site_index")
    if index is not None:
        sources.append(f"site_index from {file_path}")
    if env.get(ENV_SITE_INDEX):
        index = env[ENV_SITE_INDEX]
        sources.append(f"site_index from ${ENV_SITE_INDEX}")
    n = cfg.num_clients
    if index is None:
        shard = site_index(site, n)
        seed_index = shard
    elif str(index).strip().lower() == OWN:
        shard = None
        m = SITE_PATTERN.match(site)
        seed_index = int(m.group(1)) - 1 if m else _name_seed_index(site)
    else:
        try:
            i = int(str(index).strip())
        except ValueError:
            i = 0
        if not 1 <= i <= n:
            raise ConfigError(f"{site}: site_index {index!r} must be 1..{n} (a shard, as site-<i>) or '{OWN}'")
        shard = seed_index = i - 1
    return SiteSettings(data_dir, shard, seed_index, "; ".join(sources) or "the job's settings")


def pick_device(requested: str | None, env: dict | None = None) -> str:
    """The torch device, from what NVFlare made visible (CUDA_VISIBLE_DEVICES), never a GPU the process cannot see.

    NVFlare (simulator ``--gpu``, ``nvflare poc start -gpu``, a site's launcher) gives each client process its GPUs
    through CUDA_VISIBLE_DEVICES; inside the process they are numbered from 0, so ``cuda`` is the first GPU this
    client was given. An explicit ``cuda:<i>`` must exist among them.
    """
    import torch

    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not requested:
        return "cuda" if count else "cpu"
    if requested.startswith("cuda"):
        _, _, idx = requested.partition(":")
        i = int(idx) if idx.isdigit() else 0
        if i >= count:
            raise ConfigError(
                f"{opt('device')} {requested}: this client sees {count} GPU(s) (CUDA_VISIBLE_DEVICES={visible!r}); "
                "NVFlare "
                f"assigns GPUs per client, so leave {opt('device')} unset (or 'cuda') to use the one it was given"
            )
    return requested

"""FedBPT (federated black-box prompt tuning, arXiv 2310.01467) as an NVFlare 2.9 job.

Public API: :class:`FedBPTRecipe` (run in SimEnv, PocEnv or ProdEnv, or export) and :class:`ConfigError`.
The recipe is imported on first use, so ``import fedbpt`` loads neither NVFlare nor torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbpt.errors import ConfigError

__version__ = "0.2.0"
__all__ = ["ConfigError", "FedBPTRecipe", "__version__"]

if TYPE_CHECKING:
    from fedbpt.flare.recipe import FedBPTRecipe


def __getattr__(name: str):
    if name == "FedBPTRecipe":
        from fedbpt.flare.recipe import FedBPTRecipe

        return FedBPTRecipe
    raise AttributeError(f"module 'fedbpt' has no attribute {name!r}")

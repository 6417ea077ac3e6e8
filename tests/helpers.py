"""What many tests need: where the offline data lives, and configs built the way a run builds them."""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")  # ../shared/data beside the checkout
SST2 = os.path.join(SHARED_DATA, "sst2")
NO_SST2 = f"the real SST-2 copy is not at {SST2} (../shared/data beside the checkout; see its README)"
JOB = os.path.join(REPO, "job.py")


def make_cfg(base: dict | None = None, **kw):
    """Defaults <- ``base`` <- ``kw``, validated (the RunConfig job.py's options give, without building anything)."""
    from fedbpt.core.config import RunConfig

    return RunConfig.build(**{**(base or {}), **kw})


def resolve(argv: list[str]):
    """The RunConfig job.py builds from ``argv`` (its launcher options left out)."""
    from fedbpt.cli.options import resolve as cli_resolve

    return cli_resolve(argv)[0]

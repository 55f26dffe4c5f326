"""Set-up of this project's Ray worker processes, as a ``runtime_env``: ``QUIET_WORKERS``, which
the `magnet` command adds to every ``ray.init`` through ``RAY_RUNTIME_ENV_HOOK`` (``RUNTIME_ENV_HOOK``).

Kept free of heavy imports: Ray runs the hook in every worker process it starts, the small
bookkeeping actors included, so importing torch here would cost each of them a second or more and
hundreds of MB.
"""

from __future__ import annotations

import logging
import os
from typing import Any

CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_placement_group_cleaner() -> None:
    """Ray worker setup hook quieting Train's PlacementGroupCleaner.

    Every Train run starts that detached actor, which asks Ray's state API once a second whether
    the run's controller still lives. The state API is served by the dashboard, which needs
    ray[default] (not installed: its opencensus, aiohttp-cors and colorful are not among this
    project's dependencies), so every ask fails with a warning "Failed to query Ray Train
    Controller actor state" (about 120 lines in a demo); muting that logger loses nothing, as
    without the state API the cleaner cannot act either way (see ``pipelines.sweep.driver.run_sweep`` on
    early stopping). With several Ray instances on the machine the ask cannot even tell which
    cluster is meant and the cleaner's thread dies with a ConnectionError traceback: pointing
    RAY_ADDRESS at the worker's own cluster (what any ray.init in that worker would join anyway)
    settles that.
    """
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)


PROGRESS_ENV = "MAGNET_PROGRESS"
"""Set to 1 by `magnet` (unless --quiet): its Ray workers then show magnet.progress's lines."""


def set_up_worker() -> None:
    """Ray worker setup hook: the cleaner quieted, and training's progress lines (rank 0's, on the
    magnet.progress logger) shown only when the driver asked for them (`PROGRESS_ENV`): Ray's
    workers print every INFO line, so runs started by tests or library code would print them too."""
    from magnet.progress import LOGGER

    quiet_placement_group_cleaner()
    LOGGER.setLevel(logging.INFO if os.environ.get(PROGRESS_ENV) == "1" else logging.WARNING)


QUIET_WORKERS = {"worker_process_setup_hook": f"{__name__}.set_up_worker"}


def with_quiet_workers(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """Ray's ``RAY_RUNTIME_ENV_HOOK``: the runtime_env of a ``ray.init`` plus ``QUIET_WORKERS``, so a
    Train run started by any code of this process (the train-magnet flow's driver included) mutes
    the PlacementGroupCleaner; a setup hook the caller gave wins. `PROGRESS_ENV` travels along, to
    the workers of a cluster too."""
    given = dict(runtime_env or {})
    if PROGRESS_ENV in os.environ:
        given["env_vars"] = {PROGRESS_ENV: os.environ[PROGRESS_ENV], **given.get("env_vars", {})}
    return {**QUIET_WORKERS, **given}


RUNTIME_ENV_HOOK = f"{__name__}.with_quiet_workers"

"""Set-up of this project's Ray worker processes, as a ``runtime_env``: ``QUIET_WORKERS``.

Kept free of heavy imports: Ray runs the hook in every worker process it starts, the small
bookkeeping actors included, so importing torch here would cost each of them a second or more and
hundreds of MB.
"""

from __future__ import annotations

import logging
import os

CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_placement_group_cleaner() -> None:
    """Ray worker setup hook quieting Train's PlacementGroupCleaner.

    Every Train run starts that detached actor, which asks Ray's state API once a second whether
    the run's controller still lives. The state API is served by the dashboard, which needs
    ray[default] (not installed: its opencensus, aiohttp-cors and colorful are not among this
    project's dependencies), so every ask fails with a warning "Failed to query Ray Train
    Controller actor state" (about 120 lines in a demo); muting that logger loses nothing, as
    without the state API the cleaner cannot act either way (see ``pipelines.tune.run_sweep`` on
    early stopping). With several Ray instances on the machine the ask cannot even tell which
    cluster is meant and the cleaner's thread dies with a ConnectionError traceback: pointing
    RAY_ADDRESS at the worker's own cluster (what any ray.init in that worker would join anyway)
    settles that.
    """
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)


QUIET_WORKERS = {"worker_process_setup_hook": f"{__name__}.quiet_placement_group_cleaner"}

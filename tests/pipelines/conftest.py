"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect server and database for the module's flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield

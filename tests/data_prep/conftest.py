"""Session fixtures: the hand-built refer-format root (see refer_fixture.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from refer_fixture import build_refer_fixture


@pytest.fixture(scope="session")
def evil_marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file the malicious pickle would create if it were executed."""
    return tmp_path_factory.mktemp("evil") / "pwned"


@pytest.fixture(scope="session")
def refer_root(tmp_path_factory: pytest.TempPathFactory, evil_marker: Path) -> Path:
    return build_refer_fixture(tmp_path_factory.mktemp("refer"), evil_marker)

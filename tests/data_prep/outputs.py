"""What a preparation wrote, compared byte for byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

from data_prep.contract import WORK_DIR


def output_digests(root: Path) -> dict[str, str]:
    """sha256 of every output file (chunk markers under _work/ excluded: they hold fingerprints
    that include file modification times)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and WORK_DIR not in path.parts
    }

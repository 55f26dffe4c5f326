"""The Prefect flows (one module each), and what they share: `artifact_key`."""

from __future__ import annotations

import hashlib
import re


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from its parts (a stage, and names users chose: a dataset, a run, a
    sweep, an experiment). Prefect takes lowercase letters, digits and dashes only, and refuses any
    other key after the flow's work is done; so every other character becomes a dash, and a key
    that had to change gets 8 hex of the parts' hash, so that `My_Kitchen` and `my-kitchen` (both
    good dataset names) keep reports of their own."""
    text = "-".join(parts)
    key = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if key != text:
        key = f"{key}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return key

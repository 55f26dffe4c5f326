"""Reading what the `magnet` command printed."""

from __future__ import annotations


def plain(output: str) -> str:
    """The CLI's message without rich's box and line wrapping."""
    return " ".join(output.replace("│", " ").split())

"""Scheduler, backup, restore and verify subcommands (being built)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Adds the scheduler and backup subcommands to the CLI."""

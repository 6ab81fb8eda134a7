"""The `http` subcommand: health and metrics on gunicorn (being built)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Adds the http subcommand to the CLI."""

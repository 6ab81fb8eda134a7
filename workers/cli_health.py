"""The `healthcheck` subcommand: the image's HEALTHCHECK, for every role."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from workers import health
from workers.cli_common import settings_from


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """0 when every role recorded in the health directory passes its probe."""
    settings = settings_from(args)
    if settings.health_dir is None:
        print("no health directory: set --dir or STUI_HEALTH_DIR", file=sys.stderr)
        return 1
    findings = health.check(settings)
    if not findings:
        print(f"unhealthy: no role has started yet (nothing in {settings.health_dir})")
        return 1
    for finding in findings:
        print(f"{'healthy' if finding.healthy else 'unhealthy'}: {finding.role}: {finding.detail}")
    return 0 if all(f.healthy for f in findings) else 1


def register(sub: Any) -> None:
    """Adds the healthcheck subcommand to the CLI."""
    p = sub.add_parser(
        "healthcheck",
        help="probe the roles started in this container (the image's HEALTHCHECK)",
    )
    p.add_argument(
        "--dir",
        dest="health_dir",
        type=Path,
        help="where the roles leave their records (STUI_HEALTH_DIR)",
    )
    p.set_defaults(func=cmd_healthcheck)

"""What every benchmark command shares: progress lines, JSON-safe values."""

from __future__ import annotations

import json
import math
import string
import time
from pathlib import Path
from typing import Any

from benchmarks.servers import REPO

RESULTS = REPO / "benchmarks" / "results"


class Progress:
    """Prints a line with the seconds since the command started."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, line: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {line}", flush=True)


def plain(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value



def save_json(name: str, quick: bool, data: Any) -> Path:
    """A benchmark's results as JSON, where outputs() says; returns the path."""
    path = outputs(name, quick)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plain(data), indent=1) + "\n")
    return path


def outputs(name: str, quick: bool) -> tuple[Path, Path]:
    """(JSON results, markdown report) of `python -m benchmarks.<name>`: a
    full run writes its report into docs/, a quick one keeps both under
    benchmarks/results/quick/ so that a smoke run never overwrites figures."""
    if quick:
        out = RESULTS / "quick"
        return out / f"{name}.json", out / f"benchmarks-{name}.md"
    return RESULTS / f"{name}.json", REPO / "docs" / f"benchmarks-{name}.md"


def template(name: str) -> string.Template:
    """benchmarks/templates/<name>, the fixed text of a report, as a
    string.Template: $name and ${name} are placeholders, $$ a dollar sign.
    Found next to this module, so a run from any directory finds it."""
    path = Path(__file__).resolve().parent / "templates" / name
    return string.Template(path.read_text(encoding="utf-8"))


def template_parts(name: str) -> dict[str, string.Template]:
    """The named parts of benchmarks/templates/<name> (as template() finds
    it), each a string.Template: a part starts at a line `<!-- part: NAME -->`
    and runs to the next such line, blank lines around it left out. Text
    before the first part is a note for whoever edits the file."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in template(name).template.splitlines():
        if line.startswith("<!-- part: ") and line.endswith(" -->"):
            current = found.setdefault(line.removeprefix("<!-- part: ").removesuffix(" -->"), [])
        elif current is not None:
            current.append(line)
    return {k: string.Template("\n".join(v).strip("\n")) for k, v in found.items()}

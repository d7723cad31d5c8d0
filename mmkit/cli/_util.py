"""Small helpers shared by the command modules (kept import-light)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmkit.errors import UsageError


def existing_path(value: str) -> Path:
    """argparse `type=`: a path that must exist (one-line usage error otherwise)."""
    p = Path(value)
    if not p.exists():
        raise UsageError(f"no such file or directory: {value}")
    return p


def print_json(obj) -> None:
    """One JSON object on stdout (the `--json` contract of every command)."""
    json.dump(obj, sys.stdout, sort_keys=False)
    sys.stdout.write("\n")
    sys.stdout.flush()

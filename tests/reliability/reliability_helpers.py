"""Constants and helpers shared by the reliability tests (importable by name, unlike conftest.py)."""
from __future__ import annotations

import json
import os

from loopback import ACCESS_KEY, SECRET_KEY, free_port  # noqa: F401  (re-exported for the reliability tests)

BUCKET = "zlt-reliability"


def report(name: str, **figures) -> None:
    """Figures for RELIABILITY.md: printed (see them with -s) and appended to $ZLT_RELIABILITY_LOG if set."""
    line = json.dumps({"test": name, **figures})
    print(line)
    if os.environ.get("ZLT_RELIABILITY_LOG"):
        with open(os.environ["ZLT_RELIABILITY_LOG"], "a") as fh:
            fh.write(line + "\n")

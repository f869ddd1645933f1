"""Constants and helpers shared by the reliability tests (importable by name, unlike conftest.py)."""
from __future__ import annotations

import json
import os
import socket

ACCESS_KEY = "AKIAZLTRELIABILITY01"
SECRET_KEY = "zlt-reliability-secret-DO-NOT-LEAK-42"
BUCKET = "zlt-reliability"


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(name: str, **figures) -> None:
    """Figures for RELIABILITY.md: printed (see them with -s) and appended to $ZLT_RELIABILITY_LOG if set."""
    line = json.dumps({"test": name, **figures})
    print(line)
    if os.environ.get("ZLT_RELIABILITY_LOG"):
        with open(os.environ["ZLT_RELIABILITY_LOG"], "a") as fh:
            fh.write(line + "\n")

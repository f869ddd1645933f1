"""The de-quantised GGUF cache is written once per host, also when processes start together (`zlt run --gpus N`)."""
from __future__ import annotations

import threading
import time

from zlt_dagster.core import models


def test_processes_starting_together_convert_a_gguf_once(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("ZLT_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def convert(_gguf, out):  # slow, as the real conversion is: the second caller arrives while it runs
        calls.append(out)
        time.sleep(0.5)
        out.mkdir(parents=True)
        (out / "COMPLETE").write_text("x")

    monkeypatch.setattr(models, "_dequantise_into", convert)
    # flock excludes two open file descriptions in one process as it does two processes
    dirs = []
    threads = [threading.Thread(target=lambda: dirs.append(models._dequantised_dir(gguf))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(dirs)) == 1 and (dirs[0] / "COMPLETE").is_file()

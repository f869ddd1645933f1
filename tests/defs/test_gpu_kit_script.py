"""scripts/gpu_kit_vllm.sh builds .kit/gpu offline here, with a stand-in `python3` whose `pip download` writes an
empty wheel (or fails like pip does): the rebuild rule and pip's error output, not the real packages."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_kit_vllm.sh"

FAKE_PYTHON = r"""#!/usr/bin/env bash
# python3 -m pip download ... -d DEST PKG  |  python3 -m pip install ... --target DIR WHEEL
echo "$3 ${@: -1}" >> "$FAKE_PIP_LOG"
args=("$@"); for i in "${!args[@]}"; do
  case "${args[$i]}" in -d) dest=${args[$((i+1))]};; --target) target=${args[$((i+1))]};; esac
done
pkg=${@: -1}
if [ "$3" = download ]; then
  if [ "$pkg" = "${FAKE_PIP_FAIL:-}" ]; then
    echo "ERROR: No matching distribution found for $pkg" >&2; exit 1
  fi
  echo "Saved $dest/${pkg%%==*}-1-py3-none-any.whl"
  touch "$dest/${pkg%%==*}-1-py3-none-any.whl"
else
  mkdir -p "$target/vllm/vllm-rs" "$target/vllm-0.24.0.dist-info"; echo x > "$target/vllm/__init__.py"
fi
"""

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("git", "xz", "sha256sum", "split")),
                                reason="needs git, xz, sha256sum, split")


@pytest.fixture
def kit(tmp_path):
    """A project copy holding the script and a built shared kit (.kit/1..3, .kit/SHA256), and a run function."""
    proj = tmp_path / "proj"
    (proj / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, proj / "scripts" / SCRIPT.name)
    subprocess.run(["git", "init", "-q", str(proj)], check=True)
    for i in (1, 2, 3):
        (proj / ".kit" / str(i)).mkdir(parents=True)
        (proj / ".kit" / str(i) / f"part_0{i - 1}").write_text(f"shared kit part {i}")  # split's names, moved
    (proj / ".kit" / "SHA256").write_text("0" * 64 + "  all.tar\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    log = tmp_path / "pip.log"

    def run(**env):
        log.write_text("")
        proc = subprocess.run(["bash", "scripts/gpu_kit_vllm.sh"], cwd=proj, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                                "FAKE_PIP_LOG": str(log), **env})
        return proc, log.read_text().splitlines()

    return proj, run


def _pin(proj: Path, old: str, new: str) -> None:
    script = proj / "scripts" / SCRIPT.name
    text = script.read_text()
    assert old in text
    script.write_text(text.replace(old, new))


def test_kit_is_rebuilt_when_its_package_list_changed_and_only_then(kit):
    """A .kit/gpu left by an older version of the script used to be reused as it was (only .kit/gpu/SHA256 was
    checked)."""
    proj, run = kit
    proc, pip = run()
    assert proc.returncode == 0, proc.stderr
    assert len([c for c in pip if c.startswith("download ")]) == 21 and "Saved" not in proc.stdout + proc.stderr
    assert (proj / ".kit/gpu/1/part_00").is_file() and (proj / ".kit/gpu/1/SHA256").is_file()
    assert not (proj / ".kit/gpu.new").exists()
    assert "Land it with 1 device calls" in proc.stdout

    proc, pip = run()  # nothing changed: reused, pip not called
    assert (proc.returncode, pip) == (0, []) and "rebuilding" not in proc.stderr

    _pin(proj, "astor==0.8.1", "astor==0.8.2")
    proc, pip = run()
    assert proc.returncode == 0 and "download astor==0.8.2" in pip
    assert "built from another package list or shared kit: rebuilding" in proc.stderr

    (proj / ".kit/gpu/PACKAGES").unlink()  # as an older script left it
    proc, pip = run()
    assert proc.returncode == 0 and len(pip) == 22

    (proj / ".kit/SHA256").write_text("1" * 64 + "  all.tar\n")  # the shared kit rebuilt: its parts are in ours
    proc, pip = run()
    assert proc.returncode == 0 and len(pip) == 22


def test_a_failed_download_shows_pips_error_and_keeps_the_previous_kit(kit):
    """It used to print only "could not download <pkg>" (pip's output went to /dev/null)."""
    proj, run = kit
    assert run()[0].returncode == 0
    before = (proj / ".kit/gpu/PACKAGES").read_text()
    _pin(proj, "astor==0.8.1", "astor==9.9.9")
    proc, _ = run(FAKE_PIP_FAIL="astor==9.9.9")
    assert proc.returncode == 1
    assert ("gpu_kit_vllm: downloading astor==9.9.9 failed; pip said:\n"
            "ERROR: No matching distribution found for astor==9.9.9\n") in proc.stderr
    # nothing half-written: the old kit is untouched (and still stale for the next run), no build left over
    assert (proj / ".kit/gpu/PACKAGES").read_text() == before and (proj / ".kit/gpu/1/part_00").is_file()
    assert not (proj / ".kit/gpu.new").exists()
    proc, pip = run()
    assert proc.returncode == 0 and "download astor==9.9.9" in pip

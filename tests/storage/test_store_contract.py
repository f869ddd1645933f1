"""The same contract, run on LocalStore and on S3Store (moto server): see the `store` fixture."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from zlt_dagster.storage import MANIFEST_NAME, ChecksumError, NotFoundError, StoreError, UnsafeKeyError

UNSAFE_KEYS = ["../x", "/abs", "a//b", "a\\b", "a/../b", "a/./b", "x/..", "", "a/"]


def make_tree(root, big_size=9 * 1024 * 1024):
    """Nested files incl. one above the 8 MB multipart threshold; returns {relpath: bytes}."""
    files = {
        "adapter_config.json": b'{"r": 32, "lora_alpha": 64}',
        "nested/deeper/notes.txt": b"hello\n",
        "nested/empty.bin": b"",
        "lr=5e-06_ep=20.txt": b"human readable names are fine",
        "big/adapter_model.safetensors": os.urandom(big_size),
    }
    for rel, data in files.items():
        p = root.joinpath(*rel.split("/"))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def read_tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---- primitives ---------------------------------------------------------------------------------
def test_put_get_exists_list_delete(store):
    assert store.list_keys("") == []
    assert not store.exists("a/b.txt")
    store.put_bytes("a/b.txt", b"one")
    store.put_bytes("a/c/d.txt", b"two")
    store.put_bytes("ab/e.txt", b"three")
    assert store.exists("a/b.txt") and store.get_bytes("a/c/d.txt") == b"two"
    store.put_bytes("a/b.txt", b"overwritten")
    assert store.get_bytes("a/b.txt") == b"overwritten"
    assert store.list_keys("a") == ["a/b.txt", "a/c/d.txt"]  # directory semantics: not "ab/..."
    assert store.list_keys("a/") == ["a/b.txt", "a/c/d.txt"]
    assert store.list_keys("") == ["a/b.txt", "a/c/d.txt", "ab/e.txt"]
    assert store.list_keys("missing") == []
    store.delete("a/b.txt")
    store.delete("a/b.txt")  # deleting a missing key is fine
    assert not store.exists("a/b.txt")
    store.delete_prefix("a")
    assert store.list_keys("") == ["ab/e.txt"]
    store.delete_prefix("nothing/here")  # no-op


def test_delete_prefix_respects_segment_boundaries(store):
    store.put_bytes("cells/lr=1e-05_ep=1/x", b"1")
    store.put_bytes("cells/lr=1e-05_ep=10/x", b"10")
    store.delete_prefix("cells/lr=1e-05_ep=1")
    assert store.list_keys("cells") == ["cells/lr=1e-05_ep=10/x"]


def test_put_file_get_file(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload" * 1000)
    store.put_file("files/src.bin", src)
    dest = store.get_file("files/src.bin", tmp_path / "out" / "sub" / "dest.bin")
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(NotFoundError, match="does-not-exist"):
        store.put_file("files/x", tmp_path / "does-not-exist")


def test_missing_key_raises_not_found(store, tmp_path):
    with pytest.raises(NotFoundError, match="nope/missing.txt"):
        store.get_bytes("nope/missing.txt")
    with pytest.raises(NotFoundError, match="nope/missing.txt"):
        store.get_file("nope/missing.txt", tmp_path / "x")
    with pytest.raises(NotFoundError):
        store.read_json("nope/missing.json")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_rejected(store, key, tmp_path):
    with pytest.raises(UnsafeKeyError):
        store.put_bytes(key, b"x")
    with pytest.raises(UnsafeKeyError):
        store.get_bytes(key)
    with pytest.raises(UnsafeKeyError):
        store.exists(key)
    with pytest.raises(UnsafeKeyError):
        store.get_file(key, tmp_path / "out")
    assert store.list_keys("") == []
    assert not (tmp_path.parent / "x").exists()


@pytest.mark.parametrize("prefix", ["../x", "/abs", "a//b", "a\\b", ""])
def test_unsafe_prefixes_rejected(store, prefix):
    with pytest.raises(UnsafeKeyError):
        store.delete_prefix(prefix)
    with pytest.raises(UnsafeKeyError):
        store.commit_bytes_artifact(prefix, {"f": b"x"})
    with pytest.raises(UnsafeKeyError):
        store.artifact_exists(prefix)


def test_unsafe_relpaths_in_artifacts_rejected(store, tmp_path):
    outside = tmp_path / "evil.txt"
    outside.write_bytes(b"x")
    with pytest.raises(UnsafeKeyError):
        store.commit_artifact("art", {"../evil.txt": outside})
    with pytest.raises(UnsafeKeyError):
        store.commit_bytes_artifact("art", {MANIFEST_NAME: b"{}"})
    assert store.list_keys("") == []
    # A hand-crafted malicious manifest must not make fetch write outside local_dir.
    store.put_bytes("bad/x", b"x")
    store.put_bytes(f"bad/{MANIFEST_NAME}", json.dumps(
        {"format_version": 1, "meta": {}, "files": {"../../escaped": {"sha256": "0" * 64, "size": 1}}}).encode())
    with pytest.raises(UnsafeKeyError, match="escaped"):
        store.fetch_artifact("bad", tmp_path / "dl" / "inner")
    assert not list(tmp_path.rglob("escaped"))


# ---- JSON ---------------------------------------------------------------------------------------
def test_json_round_trip(store):
    obj = {"lr": 5e-06, "epochs": 20, "personas": ["villain", "assistant"], "rate": 0.645, "é": "ü"}
    store.write_json("sweeps/s/results.json", obj)
    assert store.read_json("sweeps/s/results.json") == obj
    store.put_bytes("sweeps/s/broken.json", b"{not json")
    with pytest.raises(StoreError, match="broken.json"):
        store.read_json("sweeps/s/broken.json")
    with pytest.raises(TypeError, match="JSON"):
        store.write_json("sweeps/s/x.json", {"x": object()})


# ---- artifacts ----------------------------------------------------------------------------------
def test_commit_and_fetch_round_trip(store, tmp_path):
    files = make_tree(tmp_path / "src")
    prefix = "sweeps/s1/cells/lr=5e-06_ep=20/adapter"
    assert not store.artifact_exists(prefix)
    manifest = store.commit_artifact(prefix, tmp_path / "src", meta={"lr": 5e-06, "epochs": 20})
    assert store.artifact_exists(prefix)
    assert manifest == store.read_manifest(prefix)
    assert manifest["meta"] == {"lr": 5e-06, "epochs": 20}
    assert manifest["format_version"] == 1 and manifest["created_at"]
    assert manifest["files"] == {
        rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for rel, data in files.items()
    }
    assert store.list_keys(prefix) == sorted([f"{prefix}/{r}" for r in files] + [f"{prefix}/{MANIFEST_NAME}"])
    out = store.fetch_artifact(prefix, tmp_path / "dl")
    assert out == tmp_path / "dl"
    assert read_tree(out) == files  # no temp files left behind, no manifest copied
    assert store.read_artifact_file(prefix, "nested/deeper/notes.txt") == b"hello\n"
    assert store.uri(prefix).endswith("sweeps/s1/cells/lr=5e-06_ep=20/adapter")


def test_commit_from_mapping_and_file_list(store, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    store.commit_artifact("m", {"x/renamed.txt": a})
    assert store.read_artifact_file("m", "x/renamed.txt") == b"A"
    store.commit_artifact("l", [a, b])
    assert sorted(store.read_manifest("l")["files"]) == ["a.txt", "b.txt"]
    with pytest.raises(NotFoundError, match="no-such-dir"):
        store.commit_artifact("d", tmp_path / "no-such-dir")
    with pytest.raises(ValueError, match="empty artifact"):
        store.commit_bytes_artifact("e", {})


def test_json_and_bytes_artifacts(store):
    store.commit_json_artifact("sweeps/s/rates", "rates.json", {"villain": 0.91}, meta={"cell": "lr=5e-06_ep=20"})
    assert json.loads(store.read_artifact_file("sweeps/s/rates", "rates.json")) == {"villain": 0.91}
    assert store.read_manifest("sweeps/s/rates")["meta"] == {"cell": "lr=5e-06_ep=20"}
    store.commit_bytes_artifact("sweeps/s/fig", {"heatmap.png": b"\x89PNG", "heatmap.pdf": b"%PDF"})
    assert store.read_artifact_file("sweeps/s/fig", "heatmap.pdf") == b"%PDF"
    with pytest.raises(NotFoundError, match="heatmap.svg"):
        store.read_artifact_file("sweeps/s/fig", "heatmap.svg")


def test_artifact_absent_until_manifest_written(store, tmp_path):
    # A writer that crashed after uploading files but before the manifest.
    store.put_bytes("crashed/adapter_model.safetensors", b"weights")
    store.put_bytes("crashed/adapter_config.json", b"{}")
    assert not store.artifact_exists("crashed")
    with pytest.raises(NotFoundError, match="manifest"):
        store.read_manifest("crashed")
    with pytest.raises(NotFoundError, match="crashed"):
        store.fetch_artifact("crashed", tmp_path / "dl")
    with pytest.raises(NotFoundError):
        store.read_artifact_file("crashed", "adapter_config.json")
    # The next successful commit cleans the orphans up.
    store.commit_bytes_artifact("crashed", {"adapter_config.json": b'{"r": 32}'})
    assert store.list_keys("crashed") == ["crashed/MANIFEST.json", "crashed/adapter_config.json"]


def test_crash_during_recommit_leaves_no_artifact(store, monkeypatch):
    store.commit_bytes_artifact("art", {"a": b"v1", "b": b"v1"})
    real_put_bytes = store.put_bytes

    def crash_before_manifest(key, data):
        if key.endswith(MANIFEST_NAME):
            raise RuntimeError("simulated crash")
        real_put_bytes(key, data)

    monkeypatch.setattr(store, "put_bytes", crash_before_manifest)
    with pytest.raises(RuntimeError):
        store.commit_bytes_artifact("art", {"a": b"v2"})
    monkeypatch.undo()
    # Old manifest was removed FIRST: no reader can see the v1 manifest beside v2 files.
    assert not store.artifact_exists("art")
    store.commit_bytes_artifact("art", {"a": b"v2"})
    assert store.read_artifact_file("art", "a") == b"v2"


def test_bad_commit_does_not_destroy_previous_version(store, tmp_path):
    store.commit_bytes_artifact("art", {"a": b"v1"})
    with pytest.raises(NotFoundError):
        store.commit_artifact("art", {"a": tmp_path / "missing"})
    with pytest.raises(TypeError):
        store.commit_bytes_artifact("art", {"a": b"v2"}, meta={"bad": object()})
    assert store.read_artifact_file("art", "a") == b"v1"


def test_checksum_mismatch_detected(store, tmp_path):
    store.commit_bytes_artifact("art", {"w/model.bin": b"0123456789", "cfg.json": b"{}"})
    store.put_bytes("art/w/model.bin", b"0123456780")  # same size, different bytes
    with pytest.raises(ChecksumError, match=r"w/model\.bin.*sha256"):
        store.fetch_artifact("art", tmp_path / "dl")
    assert not (tmp_path / "dl" / "w" / "model.bin").exists()
    assert not [p for p in (tmp_path / "dl").rglob("*") if p.is_file() and p.name != "cfg.json"]
    with pytest.raises(ChecksumError, match=r"w/model\.bin"):
        store.read_artifact_file("art", "w/model.bin")
    store.put_bytes("art/w/model.bin", b"short")  # different size
    with pytest.raises(ChecksumError, match=r"w/model\.bin.*size 5"):
        store.fetch_artifact("art", tmp_path / "dl2")


def test_missing_listed_file_raises_not_found(store, tmp_path):
    store.commit_bytes_artifact("art", {"a": b"A", "sub/b": b"B"})
    store.delete("art/sub/b")
    with pytest.raises(NotFoundError, match=r"sub/b"):
        store.fetch_artifact("art", tmp_path / "dl")
    with pytest.raises(NotFoundError, match=r"sub/b"):
        store.read_artifact_file("art", "sub/b")


def test_recommit_is_idempotent_and_removes_stale_files(store, tmp_path):
    store.commit_bytes_artifact("art", {"a": b"v1", "old/stale.txt": b"s", "keep/x": b"x"}, meta={"v": 1})
    store.put_bytes("art/orphan-from-crash", b"o")
    m2 = store.commit_bytes_artifact("art", {"a": b"v2", "keep/x": b"x", "new.txt": b"n"}, meta={"v": 2})
    expected = ["art/MANIFEST.json", "art/a", "art/keep/x", "art/new.txt"]
    assert store.list_keys("art") == expected
    assert store.read_manifest("art") == m2
    assert read_tree(store.fetch_artifact("art", tmp_path / "dl")) == {"a": b"v2", "keep/x": b"x", "new.txt": b"n"}
    m3 = store.commit_bytes_artifact("art", {"a": b"v2", "keep/x": b"x", "new.txt": b"n"}, meta={"v": 2})
    assert store.list_keys("art") == expected
    assert m3["files"] == m2["files"] and m3["meta"] == m2["meta"]
    # Fetching over a directory that already holds the artifact just overwrites it.
    assert read_tree(store.fetch_artifact("art", tmp_path / "dl")) == {"a": b"v2", "keep/x": b"x", "new.txt": b"n"}


# ---- verification: what "done" means (issue 13) -------------------------------------------------------------------
def test_verify_artifact_and_artifact_problem(store, tmp_path):
    from zlt_dagster.storage.base import ARTIFACT_MISSING, ManifestError

    assert store.artifact_problem("art") == ARTIFACT_MISSING
    files = make_tree(tmp_path / "src", big_size=6 * 1024 * 1024)
    manifest = store.commit_artifact("art", tmp_path / "src")
    assert store.verify_artifact("art") == manifest and store.artifact_problem("art") is None
    big = "art/big/adapter_model.safetensors"
    store.put_bytes(big, files["big/adapter_model.safetensors"][:-1] + b"\x00")  # same size, other bytes: torn
    with pytest.raises(ChecksumError, match=r"big/adapter_model\.safetensors.*sha256"):
        store.verify_artifact("art")
    assert store.artifact_problem("art").startswith("ChecksumError: artifact file 'big/adapter_model.safetensors'")
    store.put_bytes(big, b"short")
    assert "size 5 bytes" in store.artifact_problem("art")
    store.delete(big)  # a listed file missing: partial
    assert store.artifact_problem("art").startswith("NotFoundError: artifact") and "is incomplete" in \
        store.artifact_problem("art")
    store.put_bytes(f"art/{MANIFEST_NAME}", b'{"files": ')  # an unreadable manifest
    with pytest.raises(ManifestError, match="not valid UTF-8 JSON"):
        store.verify_artifact("art")
    assert store.artifact_problem("art").startswith("ManifestError:")


def test_artifact_problem_raises_when_the_store_fails(aws_env, closed_port):
    """A store that cannot be reached is an error, never taken for a missing (to be rebuilt) artifact."""
    from zlt_dagster.storage import S3Store

    store = S3Store("bucket", endpoint_url=f"http://127.0.0.1:{closed_port}", connect_timeout=0.5, read_timeout=0.5,
                    max_attempts=1)
    with pytest.raises(StoreError, match="Could not connect"):
        store.artifact_problem("art")

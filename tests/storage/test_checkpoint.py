"""Tests of storage/checkpoint.py: atomic writes, manifests, listing only complete checkpoints."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage import (
    CheckpointError,
    TableSpec,
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    checkpoint,
    create_table,
    latest_checkpoint,
    list_checkpoints,
    open_table,
    read_manifest,
    step_dir,
    step_of,
    table_path,
    verify_checkpoint,
    write_manifest,
)


def complete(root, step, extra=None, **manifest):
    """Make a complete checkpoint step-<step> under root with one dense file and a manifest."""
    d = step_dir(root, step)
    atomic_write_bytes(d / "dense" / "model.bin", b"weights-%d" % step + (extra or b""))
    write_manifest(d, dict(manifest))
    return d


def leftovers(directory):
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


@given(st.integers(0, 10**12))
def test_step_dir_name_round_trips(step):
    assert step_dir("/ckpt", step).name == f"step-{step}"
    assert step_of(step_dir("/ckpt", step)) == step


@pytest.mark.parametrize("name", ["step-01", "step-", "step--1", "steps-1", "step-1.tmp", "1"])
def test_misnamed_directory_is_not_a_checkpoint(name):
    with pytest.raises(CheckpointError):
        step_of(f"/ckpt/{name}")


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "state.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert leftovers(tmp_path) == []
    atomic_write_json(tmp_path / "c.json", {"b": [1, 2.5], "a": "x"})
    assert json.loads((tmp_path / "c.json").read_text()) == {"a": "x", "b": [1, 2.5]}


def test_writer_failing_mid_way_leaves_old_content_and_no_partial_file(tmp_path):
    target = tmp_path / "state.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_open(target) as f:
        f.write(b"half of the new conte")
        raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "new.bin") as f:
        f.write(b"partial")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_failing_fsync_leaves_no_file(tmp_path, monkeypatch):
    def broken_fsync(fd):
        raise OSError("EIO")

    monkeypatch.setattr(checkpoint.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="EIO"):
        atomic_write_bytes(tmp_path / "x.bin", b"data")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_fsyncs_the_file_and_then_its_directory(tmp_path, monkeypatch):
    kinds = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        kinds.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", recording_fsync)
    atomic_write_bytes(tmp_path / "x.bin", b"data")
    assert kinds == ["file", "dir"]


def test_unserialisable_json_raises_checkpoint_error_and_writes_nothing(tmp_path):
    for bad in ({"loss": float("nan")}, {"arr": np.zeros(2)}):
        with pytest.raises(CheckpointError):
            atomic_write_json(tmp_path / "m.json", bad)
    assert list(tmp_path.iterdir()) == []


def test_manifest_records_step_format_and_every_file_with_size_and_checksum(tmp_path):
    d = complete(tmp_path, 5, config={"lr": 0.1})
    manifest = read_manifest(d)
    assert manifest["step"] == 5 and manifest["format"] == "ultramem.checkpoint"
    assert manifest["config"] == {"lr": 0.1} and isinstance(manifest["created"], str)
    (entry,) = manifest["files"]
    assert entry["path"] == "dense/model.bin" and entry["bytes"] == len(b"weights-5")
    assert len(entry["sha256"]) == 64
    assert verify_checkpoint(d) == manifest


def test_verify_detects_changed_truncated_and_missing_files(tmp_path):
    d = step_dir(tmp_path, 1)
    atomic_write_bytes(d / "small", b"abc")
    atomic_write_bytes(d / "big", b"0123456789" * 300_000)  # 3 MB: hashed too, whatever its size
    write_manifest(d, {})
    files = {f["path"]: f for f in read_manifest(d)["files"]}
    assert len(files["small"]["sha256"]) == len(files["big"]["sha256"]) == 64
    (d / "small").write_bytes(b"abd")  # same size, other bytes
    with pytest.raises(CheckpointError, match="small: sha256"):
        verify_checkpoint(d)
    (d / "small").write_bytes(b"abc")
    (d / "big").write_bytes(b"01234")
    with pytest.raises(CheckpointError, match="big: 5 bytes"):
        verify_checkpoint(d)
    (d / "big").unlink()
    with pytest.raises(CheckpointError, match="big: missing"):
        verify_checkpoint(d)


def test_a_file_without_a_recorded_sha256_is_checked_by_size_only(tmp_path):
    # manifests written before every file had a sha256 (files over 1 MiB had none) still load
    d = step_dir(tmp_path, 1)
    atomic_write_bytes(d / "big", b"0123456789")
    write_manifest(d, {"files": [{"path": "big", "bytes": 10}]})
    (d / "big").write_bytes(b"9876543210")
    assert verify_checkpoint(d)["files"] == [{"path": "big", "bytes": 10}]
    (d / "big").write_bytes(b"98765")
    with pytest.raises(CheckpointError, match="big: 5 bytes"):
        verify_checkpoint(d)


def test_a_manifest_that_lists_no_files_does_not_verify(tmp_path):
    d = step_dir(tmp_path, 1)
    atomic_write_bytes(d / "x", b"abc")
    write_manifest(d, {}, record_files=False)
    with pytest.raises(CheckpointError, match="lists no files"):
        verify_checkpoint(d)


def test_required_files_must_be_listed_and_unlisted_table_files_are_wrong(tmp_path):
    d = step_dir(tmp_path, 1)
    atomic_write_bytes(d / "dense.pt", b"abc")
    write_manifest(d, {})
    with pytest.raises(CheckpointError, match="config.json: not in the manifest"):
        verify_checkpoint(d, required=["dense.pt", "config.json"])
    atomic_write_bytes(d / "tables" / "t" / "values" / "c" / "0" / "0", b"chunk")  # zarr would read it
    with pytest.raises(CheckpointError, match="tables/t/values/c/0/0: not in the manifest"):
        verify_checkpoint(d)


def test_only_limits_verification_to_the_files_it_accepts(tmp_path):
    d = step_dir(tmp_path, 1)
    atomic_write_bytes(d / "a", b"abc")
    atomic_write_bytes(d / "b", b"def")
    write_manifest(d, {})
    (d / "b").write_bytes(b"xyz")
    verify_checkpoint(d, only=lambda rel: rel == "a")
    with pytest.raises(CheckpointError, match="b: sha256"):
        verify_checkpoint(d, only=lambda rel: rel == "b")


def test_digests_the_writers_computed_are_used_and_never_read_again(tmp_path, monkeypatch):
    d = step_dir(tmp_path, 1)
    atomic_write_bytes(d / "chunk", b"payload")
    atomic_write_bytes(d / "dense.pt", b"dense")
    known = {"chunk": checkpoint.file_digest(d / "chunk")}
    read = []
    original = checkpoint.file_digest
    monkeypatch.setattr(checkpoint, "file_digest", lambda path: read.append(os.path.basename(path)) or original(path))
    write_manifest(d, {}, known=known)
    assert read == ["dense.pt"]
    assert {f["path"]: f for f in read_manifest(d)["files"]}["chunk"] == {"path": "chunk", **known["chunk"]}
    stale = {"chunk": {"bytes": 3, "sha256": "0" * 64}}  # its size no longer matches: hashed afresh
    d2 = step_dir(tmp_path, 2)
    atomic_write_bytes(d2 / "chunk", b"payload")
    write_manifest(d2, {}, known=stale)
    verify_checkpoint(d2)


@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=12), st.integers(1, 4))
def test_parallel_digests_equal_serial_ones(tmp_path_factory, blobs, threads):
    root = tmp_path_factory.mktemp("digests")
    for i, blob in enumerate(blobs):
        (root / f"f{i}").write_bytes(blob)
    names = [f"f{i}" for i in range(len(blobs))]
    parallel = checkpoint.digest_files(root, names, threads=threads)
    assert parallel == {n: checkpoint.file_digest(root / n) for n in names}
    assert [parallel[n]["bytes"] for n in names] == [len(b) for b in blobs]


def test_set_aside_frees_the_step_and_hides_the_damaged_directory(tmp_path):
    complete(tmp_path, 1)
    d = complete(tmp_path, 2)
    (d / "manifest.json").write_text("{not json")
    first = checkpoint.set_aside(d)
    assert first.name == "step-2.damaged" and not d.exists()
    complete(tmp_path, 2)
    (d / "manifest.json").write_text("{not json")
    assert checkpoint.set_aside(d).name == "step-2.damaged-2"
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [1]


def test_checkpoint_without_manifest_is_never_listed_or_loaded(tmp_path):
    complete(tmp_path, 1)
    unfinished = step_dir(tmp_path, 2)
    atomic_write_bytes(unfinished / "dense" / "model.bin", b"half")
    assert list_checkpoints(tmp_path) == [(1, step_dir(tmp_path, 1))]
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 1)
    with pytest.raises(CheckpointError, match="unfinished"):
        read_manifest(unfinished)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda m: json.dumps(m)[:-7],  # truncated
        lambda m: "",
        lambda m: "[1, 2]",
        lambda m: json.dumps({**m, "format": "something.else"}),
        lambda m: json.dumps({**m, "format_version": 99}),
        lambda m: json.dumps({**m, "step": 4}),  # copied from another checkpoint
        lambda m: json.dumps({k: v for k, v in m.items() if k != "created"}),
        lambda m: json.dumps({**m, "files": [{"path": "../../etc/passwd", "bytes": 1}]}),
        lambda m: json.dumps({**m, "files": [{"path": "x"}]}),
    ],
)
def test_corrupt_manifest_is_rejected_and_never_listed(tmp_path, corrupt):
    d = complete(tmp_path, 3)
    manifest_path = d / "manifest.json"
    manifest_path.write_text(corrupt(json.loads(manifest_path.read_text())))
    with pytest.raises(CheckpointError):
        read_manifest(d)
    assert list_checkpoints(tmp_path) == []
    assert latest_checkpoint(tmp_path) is None


def test_latest_checkpoint_picks_the_highest_valid_step_numerically(tmp_path):
    for step in (2, 9, 10):
        complete(tmp_path, step)
    (step_dir(tmp_path, 11) / "tables").mkdir(parents=True)  # being written
    (tmp_path / "step-12.old").mkdir()  # not a checkpoint name
    (tmp_path / "notes.txt").write_text("hi")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 9, 10]
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 10)
    assert latest_checkpoint(tmp_path / "missing") is None


def test_manifest_must_agree_with_its_directory(tmp_path):
    (tmp_path / "final").mkdir()
    with pytest.raises(CheckpointError):
        write_manifest(tmp_path / "final", {})
    step_dir(tmp_path, 3).mkdir()
    with pytest.raises(CheckpointError):
        write_manifest(step_dir(tmp_path, 3), {"step": 4})
    with pytest.raises(CheckpointError):
        write_manifest(step_dir(tmp_path, 8), {})  # directory does not exist
    assert list_checkpoints(tmp_path) == []


def test_manifest_ignores_unfinished_atomic_writes(tmp_path):
    d = step_dir(tmp_path, 1)
    atomic_write_bytes(d / "a.bin", b"a")
    (d / ".b.bin.x1y2.tmp").write_bytes(b"partial")  # a writer died here
    write_manifest(d, {})
    assert [f["path"] for f in read_manifest(d)["files"]] == ["a.bin"]


def test_checkpoint_with_a_table_loads_back_from_the_latest_step(tmp_path):
    spec = TableSpec("mem0", rows=30, dim=4, num_partitions=3, seed=2)
    live = create_table(tmp_path / "live", spec)
    live.write_rows(1, np.array([2]), {"step": np.array([7], np.int32)})
    d = step_dir(tmp_path / "ckpt", 100)
    saved = create_table(table_path(d, spec.name), spec, initialize=False)
    for p in range(spec.num_partitions):  # each shard writes only its partitions
        saved.write_partition(p, live.read_partition(p))
    write_manifest(d, {"tables": [spec.name]})
    loaded_dir = latest_checkpoint(tmp_path / "ckpt")
    assert loaded_dir == d
    manifest = verify_checkpoint(loaded_dir)
    assert any(f["path"] == "tables/mem0/zarr.json" for f in manifest["files"])
    loaded = open_table(table_path(loaded_dir, manifest["tables"][0]))
    assert loaded.spec == spec
    for p in range(spec.num_partitions):
        for name, a in loaded.read_partition(p).items():
            assert np.array_equal(a, live.read_partition(p)[name])
    with pytest.raises(CheckpointError):
        table_path(d, "../x")

"""The shard's durable update log (param_server/update_log.py; docs/reliability.md §6): records
round-trip, a torn tail is ignored, segments are cut at checkpoints, and a shard rebuilt from a
checkpoint plus the log equals the shard that never crashed, applying each push exactly once."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from param_server.errors import WaitTimeoutError
from param_server.shard import Shard, ShardConfig
from param_server.update_log import INIT, LogRecord, UpdateLog, encode_record, read_segment
from storage.layout import TableSpec

SPEC = TableSpec(name="t", rows=40, dim=4, num_partitions=4, optimizer="adamw")


def _shard(parts=(0, 1, 2, 3)) -> Shard:
    from storage.layout import init_partition_values

    shard = Shard(ShardConfig())
    shard.add_table(SPEC, {p: {"values": init_partition_values(SPEC, p)} for p in parts})
    return shard


def _push(shard: Shard, worker: int, seq: int, step: int, rows, seed: int) -> bool:
    grads = np.random.default_rng(seed).standard_normal((len(rows), SPEC.dim)).astype(np.float32)
    return shard.push("t", worker, seq, step, 0.01, np.asarray(rows, np.int64), grads)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 2**40), st.integers(-1, 10**6),
       st.floats(0, 10, allow_nan=False), st.integers(0, 20), st.text(min_size=1, max_size=12))
def test_a_record_round_trips(worker, seq, step, lr, n, table):
    rows = np.arange(n, dtype=np.int64)[::-1].copy()
    grads = np.random.default_rng(n).standard_normal((n, 3)).astype(np.float32)
    rec = LogRecord(table, worker, seq, step, lr, rows, grads)
    (tmp := _tmp_file()).write_bytes(encode_record(rec) * 2)
    got, valid = read_segment(tmp)
    assert valid == tmp.stat().st_size and len(got) == 2
    for g in got:
        assert (g.table, g.worker_id, g.seq, g.step, g.lr) == (table, worker, seq, step, lr)
        np.testing.assert_array_equal(g.rows, rows)
        np.testing.assert_array_equal(g.grads, grads)


def _tmp_file():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="ulog-")) / "seg.log"


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 200))
def test_a_torn_tail_is_ignored_and_cut_before_appending(cut):
    rec = LogRecord("t", 1, 1, 0, 0.1, np.arange(5, dtype=np.int64), np.ones((5, 4), np.float32))
    one = encode_record(rec)
    path = _tmp_file()
    log = UpdateLog(path.parent)
    log.open(INIT)
    log.append(rec)
    log.close()
    seg = path.parent / "base-init.log"
    seg.write_bytes(one + one[: cut % len(one)])  # a crash in the middle of the second append
    assert len(read_segment(seg)[0]) == 1
    log.open(INIT)  # cuts the torn tail, then appends after the good record
    log.append(rec)
    log.close()
    assert len(read_segment(seg)[0]) == 2 and seg.stat().st_size == 2 * len(one)


def test_a_checkpoint_starts_a_segment_and_older_ones_go_once_a_newer_checkpoint_is_valid(tmp_path):
    log = UpdateLog(tmp_path)
    log.open(INIT)
    rec = LogRecord("t", 0, 1, 0, 0.1, np.zeros(0, np.int64), np.zeros((0, 4), np.float32))
    log.append(rec)
    log.rotate(10)
    log.append(rec)
    assert [b for b, _ in log.segments()] == [INIT, 10]
    assert len(list(log.replay_records(INIT))) == 2  # checkpoint 10 never completed: replay both
    assert len(list(log.replay_records(10))) == 1
    log.rotate(20)
    log.prune(10)  # checkpoint 10 is valid now
    assert [b for b, _ in log.segments()] == [10, 20]
    log.close()


def test_a_shard_rebuilt_from_a_checkpoint_and_its_log_equals_the_one_that_never_crashed(tmp_path):
    live = _shard()
    log = UpdateLog(tmp_path)
    log.open(INIT)
    live.attach_log(log)
    for seq in range(1, 6):
        assert _push(live, 0, seq, seq - 1, [seq, 7, 2 * seq], seed=seq)
    snapshot = {p: {k: v.copy() for k, v in a.items()} for p, a in live.export_partitions("t").items()}
    log.rotate(5)  # "checkpoint 5" = snapshot
    for seq in range(6, 12):
        assert _push(live, 1 - seq % 2, seq, seq - 1, [seq % 40, 3], seed=seq)
    assert not _push(live, 0, 11, 10, [1], seed=99)  # a duplicate: not logged, not applied
    live.drain()
    log.close()

    rebuilt = Shard(ShardConfig())
    rebuilt.add_table(SPEC, snapshot)
    assert rebuilt.replay(UpdateLog(tmp_path).replay_records(5)) == 6
    for p, arrays in live.export_partitions("t").items():
        for k, v in arrays.items():
            np.testing.assert_array_equal(rebuilt.export_partitions("t")[p][k], v, err_msg=f"{p}/{k}")
    assert rebuilt.last_seq(0) == live.last_seq(0) == 11 and rebuilt.applied_step(0, "t") == live.applied_step(0, "t")
    # a client re-sending the last push it never saw acknowledged: dropped, applied once
    assert not _push(rebuilt, 0, 11, 10, [11, 3], seed=11)
    live.close()
    rebuilt.close()


def test_replay_skips_rows_of_partitions_this_shard_no_longer_owns(tmp_path):
    log = UpdateLog(tmp_path)
    log.open(INIT)
    log.append(LogRecord("t", 0, 1, 0, 0.5, np.array([0, 1, 2, 3], np.int64), np.ones((4, 4), np.float32)))
    log.close()
    shard = _shard(parts=(0, 1))
    before = shard.export_partitions("t")
    assert shard.replay(UpdateLog(tmp_path).replay_records(INIT)) == 1
    after = shard.export_partitions("t")
    assert not np.array_equal(after[0]["values"], before[0]["values"])
    shard.close()


def test_a_shard_restored_from_a_checkpoint_with_an_empty_log_resumes_clocks_and_seqs(tmp_path):
    # killed right after a checkpoint: the log since is empty, so only the progress saved with the
    # checkpoint says the worker's pushes up to step 4 (seq 5) are in it
    from storage.table_store import create_table

    live = _shard()
    for seq in range(1, 6):
        assert _push(live, 3, seq, seq - 1, [seq, 9], seed=seq)
    create_table(tmp_path / "t", SPEC, initialize=False)
    progress = live.save(tmp_path)
    assert progress == {"applied_step": [[3, "t", 4]], "last_seq": [[3, 5]]}

    cold = Shard(ShardConfig(wait_timeout_s=0.5))
    cold.add_table(SPEC, live.export_partitions("t"))
    with pytest.raises(WaitTimeoutError):  # what the restarted shard did before: wait for step 2 forever
        cold.gather("t", [1], worker_id=3, min_step=2)

    restored = Shard(ShardConfig(wait_timeout_s=0.5))
    restored.add_table(SPEC, live.export_partitions("t"))
    restored.restore_progress(json.loads(json.dumps(progress)))  # as the actor reads it back
    np.testing.assert_array_equal(restored.gather("t", [1], worker_id=3, min_step=4), live.gather("t", [1]))
    assert restored.applied_step(3, "t") == 4 and restored.last_seq(3) == 5
    assert not _push(restored, 3, 5, 4, [1], seed=5)  # already in the checkpoint: a duplicate
    assert _push(restored, 3, 6, 5, [1], seed=6)
    restored.drain()
    assert restored.applied_step(3, "t") == 5
    for s in (live, cold, restored):
        s.close()

"""UltraMemV2 on the shards (DESIGN §3.3, §4.3): one sync worker trains `tiny_v2` exactly as `--local`.

Pooled mode sends each token's projected query q_p and the shards score the pre-values themselves
(PooledGather / PooledBackward with `pre_table` and `q_p`); rows mode gathers and pushes the pre-value
table like the value table. Both must end with the local run's dense parameters, value and pre-value
tables and optimizer state to the tolerance of test_distributed.py. Pooled mode runs on one shard
here: over several shards the client adds the shards' partial sums (and dL/dq_p parts) in another
order than one local sum, and AdamW turns those float32 roundings on near-zero gradients into
parameter differences of up to ~3e-6 (measured over 4 steps on 2 shards: 3 of ~100k dense
parameters beyond 1e-6 + 1e-5·|x|, the tables within it); tests/model_workers/test_pooled.py checks
two pooled V2 layers over two gRPC shards against local training at the pooled tests' tolerance.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from orchestration.config import load_config
from orchestration.distributed import train_distributed
from storage.table_store import open_table

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 4


def tiny_v2_config(lookup: str, **cluster: object):
    cfg = load_config(preset="tiny_v2", overrides=[f"train.max_steps={STEPS}", f"train.checkpoint_every={STEPS}",
                                                   "train.eval_every=0", "train.keep_checkpoints=0",
                                                   f"model.memory.lookup={lookup}"])
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, **cluster))


@pytest.mark.parametrize(("lookup", "shards"), [("pooled", 1), ("rows", 2)])
def test_one_sync_worker_trains_tiny_v2_on_shards_exactly_as_local(ray_session, e2e, tmp_path, lookup, shards):
    cfg = tiny_v2_config(lookup, shards=shards, workers=1, consistency="sync")
    local = e2e.local_run(cfg, tmp_path / "local")
    result = train_distributed(cfg, tmp_path / "remote", progress=False)
    assert result.steps == STEPS and result.checkpoint is not None
    e2e.assert_same_state(result.checkpoint, local)
    _, final = e2e.final_state(result.checkpoint)  # ... and the remote pre-values really learned
    initial = open_table(tmp_path / "remote" / "tables" / "mem1.pre_values")
    moved = [not np.array_equal(final[f"mem1.pre_values/{p}/values"], initial.read_partition(p)["values"])
             for p in range(initial.spec.num_partitions)]
    assert any(moved)

"""Placement on a simulated multi-node cluster (ray.cluster_utils.Cluster, DESIGN §1).

Two "memory nodes" (resource memory_shard, no CPUs) and one "compute node" (CPUs, model_worker):
shards must land only on memory nodes, the worker only on the compute node, and 4 shards with 1
worker must train exactly like `--local`. The cluster runs in a child process, because a process
can hold only one Ray connection and the rest of the suite shares the session's local Ray.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

JOB = """
cfg = load_config(preset="tiny", overrides=["train.max_steps=20", "train.eval_every=0", "train.checkpoint_every=20"])
cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, shards=4, workers=1, consistency="sync"))
trainer = DistributedTrainer(cfg, out, address=cluster.address, progress=False)
try:
    placement = trainer.placement()
    result = trainer.run()
finally:
    trainer.close()
print(json.dumps({"placement": placement, "head": cluster.head_node.node_id,
                  "memory_nodes": [n.node_id for n in memory_nodes],
                  "checkpoint": str(result.checkpoint), "steps": result.steps}))
"""


def test_shards_land_on_memory_nodes_and_workers_on_compute_nodes(tmp_path, e2e, local_tiny_run):
    report = e2e.run_cluster_job(JOB, tmp_path / "run", memory_nodes=2, shard_units=2, store_mb=96)
    placement, memory_nodes = report["placement"], set(report["memory_nodes"])
    assert len(placement["shards"]) == 4 and set(placement["shards"]) <= memory_nodes
    assert len(set(placement["shards"])) == 2  # spread over both memory nodes (2 memory_shard units each)
    assert placement["workers"] == [report["head"]]
    assert report["steps"] == e2e.STEPS
    e2e.assert_same_state(Path(report["checkpoint"]), local_tiny_run)

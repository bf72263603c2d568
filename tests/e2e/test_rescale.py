"""Online rescaling while training runs (DESIGN §4.1): 2 -> 4 -> 3 shards, nothing lost or applied twice.

`ultramem shards scale --to N` (its entry point, called from another thread against the session's
Ray, as the CLI does with `--address auto`) finds the job's named coordinator and the driver moves
partitions one at a time while the sync worker keeps training. Clients with a stale map get
FAILED_PRECONDITION with the new epoch and re-route. The final values must equal the same run
without rescaling (`--local`), which only holds if every push was applied exactly once and every
lookup waited for the pushes before it.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import pytest

from model_workers.trainer import LocalTrainer
from orchestration import cmd_scale
from orchestration.config import to_dict
from orchestration.distributed import DistributedTrainer
from orchestration.rescale import plan_moves

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_plan_moves_keeps_what_can_stay_and_balances():
    owner = [0, 1, 0, 1, 0, 1, 0, 1]
    moves = plan_moves(owner, [0, 1, 2, 3])
    assert len(moves) == 4 and {d for _, _, d in moves} == {2, 3}
    after = list(owner)
    for p, src, dst in moves:
        assert after[p] == src
        after[p] = dst
    assert sorted(after.count(s) for s in range(4)) == [2, 2, 2, 2]
    down = plan_moves(after, [0, 1, 2])
    assert {s for _, s, _ in down} == {3} and len(down) == 2


STEPS = 60  # long enough that both rescales finish while the worker is still training


@pytest.fixture(scope="module")
def local_run(e2e, tmp_path_factory):
    """The same run without any shard: `--local`, which a sync run on any shard count equals."""
    cfg = e2e.tiny_config(steps=STEPS)
    trainer = LocalTrainer(cfg.model, cfg.train, cfg.data, tmp_path_factory.mktemp("local60"), config=to_dict(cfg),
                           progress=False)
    return trainer.run().checkpoint


def test_scaling_2_to_4_to_3_shards_during_sync_training_matches_a_run_without(ray_session, e2e, local_run,
                                                                                tmp_path):
    cfg = e2e.tiny_config(steps=STEPS, shards=2, workers=1, consistency="sync")
    trainer = DistributedTrainer(cfg, tmp_path, progress=False)
    outcomes: list[dict] = []
    errors: list[BaseException] = []

    def operator() -> None:  # what `ultramem shards scale --to N --address auto` does, mid-run
        try:
            while trainer.step < 2:
                time.sleep(0.02)
            for to in (4, 3):
                outcomes.append(cmd_scale.request_rescale(to))
                outcomes[-1]["at_step"] = trainer.step
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=operator)
    try:
        assert json.loads((tmp_path / "job.json").read_text())["job"] == trainer.job
        thread.start()
        result = trainer.run()
        thread.join(120)
        placement = trainer.placement()
    finally:
        trainer.close()
    assert not errors, errors
    assert [o["state"] for o in outcomes] == ["done", "done"], outcomes
    assert [(o["before"], o["after"]) for o in outcomes] == [(2, 4), (4, 3)]
    assert all(o["at_step"] < STEPS for o in outcomes), outcomes  # both happened while training ran
    assert len(placement["shards"]) == 3
    max_pause = max(o["max_pause_s"] for o in outcomes)
    assert max_pause < 5.0, max_pause  # one partition's hand-off, not a stop of the run
    assert result.steps == STEPS
    e2e.assert_same_state(result.checkpoint, local_run)


def test_scale_command_without_a_running_job_is_a_usage_error(ray_session):
    from orchestration.errors import UsageError

    with pytest.raises(UsageError, match="no running"):
        cmd_scale.scale(argparse.Namespace(to=2, address="auto"))

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


STEPS = 60
HOLD_AT = 50  # the driver waits at this checkpoint until both rescales are done: they happen mid-run


@pytest.fixture(scope="module")
def local_run(e2e, tmp_path_factory):
    """The same run without any shard: `--local`, which a sync run on any shard count equals."""
    cfg = e2e.tiny_config(steps=STEPS)
    trainer = LocalTrainer(cfg.model, cfg.train, cfg.data, tmp_path_factory.mktemp("local60"), config=to_dict(cfg),
                           progress=False)
    return trainer.run().checkpoint


def test_scaling_2_to_4_to_3_shards_during_sync_training_matches_a_run_without(ray_session, e2e, local_run,
                                                                                tmp_path, monkeypatch):
    cfg = e2e.tiny_config(steps=STEPS, shards=2, workers=1, consistency="sync")
    trainer = DistributedTrainer(cfg, tmp_path, progress=False)
    outcomes: list[dict] = []
    errors: list[BaseException] = []
    first_chunk_done, rescaled = threading.Event(), threading.Event()
    save = trainer.save

    def save_then_hold() -> object:
        """The checkpoint at each boundary; the first one lets the operator start, and the run holds at
        HOLD_AT until the operator is done, so both rescales land while training still runs (however
        slow the machine) and the chunks before HOLD_AT run beside them."""
        path = save()
        first_chunk_done.set()
        if trainer.step == HOLD_AT:
            assert rescaled.wait(300), "the rescales did not finish"
        return path

    monkeypatch.setattr(trainer, "save", save_then_hold)

    def operator() -> None:  # what `ultramem shards scale --to N --address auto` does, mid-run
        try:
            assert first_chunk_done.wait(300), "training never reached its first checkpoint"
            for to in (4, 3):
                outcomes.append(cmd_scale.request_rescale(to))
                outcomes[-1]["at_step"] = trainer.step
        except BaseException as err:
            errors.append(err)
        finally:
            rescaled.set()

    thread = threading.Thread(target=operator)
    try:
        assert json.loads((tmp_path / "job.json").read_text())["job"] == trainer.job
        thread.start()
        result = trainer.run()
        thread.join(120)
        placement = trainer.placement()
    finally:
        rescaled.set()
        first_chunk_done.set()
        trainer.close()
    assert not errors, errors
    assert [o["state"] for o in outcomes] == ["done", "done"], outcomes
    assert [(o["before"], o["after"]) for o in outcomes] == [(2, 4), (4, 3)]
    assert all(o["at_step"] < STEPS for o in outcomes), outcomes  # both happened while training ran
    assert len(placement["shards"]) == 3
    max_pause = max(o["max_pause_s"] for o in outcomes)
    assert max_pause < 20.0, max_pause  # one partition's hand-off, not a stop of the run (bound for a busy machine)
    assert result.steps == STEPS
    e2e.assert_same_state(result.checkpoint, local_run)


def test_scale_command_without_a_running_job_is_a_usage_error(ray_session):
    from orchestration.errors import UsageError

    with pytest.raises(UsageError, match="no running"):
        cmd_scale.scale(argparse.Namespace(to=2, address="auto"))

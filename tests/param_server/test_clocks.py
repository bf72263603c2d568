"""param_server/clocks.py: a min_step lookup passes exactly when every push of that worker to that
table up to min_step has been applied (DESIGN §4.3), whatever order the pushes are applied in."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from param_server.clocks import StepClocks


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.integers(-1, 6), min_size=1, max_size=12), data=st.data())
def test_reached_means_every_push_up_to_min_step_was_applied(steps, data):
    clocks = StepClocks()
    for s in steps:
        clocks.queue(7, "t", s)
    clocks.queue(7, "other", 100)  # another table's push never releases table t
    clocks.applied(7, "other", 100, seq=99)
    order = data.draw(st.permutations(range(len(steps))))
    done: list[int] = []
    for seq, i in enumerate(order, start=1):
        clocks.applied(7, "t", steps[i], seq)
        done.append(steps[i])
        left = [steps[j] for j in order[len(done):]]
        for min_step in range(-1, 8):
            want = max(done) >= min_step and not any(s <= min_step for s in left)
            assert clocks.reached(7, "t", min_step) == want
    assert clocks.step(7, "t") == max(steps) and clocks.step(7) == max(steps)
    assert not clocks.reached(8, "t", 0) and clocks.reached(8, "t", -1)  # an unknown worker: clock -1


def test_a_refused_push_leaves_the_queue_and_a_merge_keeps_existing_clocks():
    clocks = StepClocks()
    clocks.queue(1, "t", 3)
    assert not clocks.reached(1, "t", 3)
    clocks.unqueue(1, "t", 3)
    clocks.merge([(1, "t", 5), (2, "t", 4)])
    assert clocks.step(1, "t") == 5 and clocks.step(2, "t") == 4
    clocks.queue(2, "t", 6)
    clocks.applied(2, "t", 6, seq=1)
    clocks.merge([(2, "t", 1)])  # a lower clock from a previous owner changes nothing here
    assert clocks.items() == [(1, "t", 5), (2, "t", 6)] and clocks.workers() == [1, 2]
    clocks.restore([(1, "t", 9)], [(3, 4)])
    assert clocks.step(1, "t") == 9 and clocks.workers() == [1, 2, 3]

"""Shared fixtures: one local Ray for the whole test session, started only if a test asks for it.

DESIGN §8: Ray binds 0.0.0.0 and writes ~/.ray/auth_token unless told otherwise, and `ray stop`
kills every Ray process on the machine. The fixture keeps Ray on 127.0.0.1 with a token held in
the environment, a small object store and no dashboard, and stops only what it started.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the token cache of this test session (inherited by Ray workers): never the user's ~/.cache
_OWN_CACHE = None if "ULTRAMEM_CACHE" in os.environ else tempfile.mkdtemp(prefix="ultramem-test-cache-")
if _OWN_CACHE:
    os.environ["ULTRAMEM_CACHE"] = _OWN_CACHE


@pytest.fixture(scope="session", autouse=True)
def _remove_test_cache() -> Iterator[None]:
    yield
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the session: 8 logical CPUs (room for 4 shards and 2 workers), 128 MB object
    store, loopback only."""
    from orchestration.cluster import Cluster, ClusterConfig

    cluster = Cluster(ClusterConfig(num_cpus=8, object_store_mb=128))
    cluster.connect()
    try:
        yield None
    finally:
        cluster.close()


def _wait_until(condition: Callable[[], object], timeout: float = 60.0, what: str = "the condition") -> object:
    """Poll `condition` until it returns something truthy (returned); fail the test after `timeout` s.

    What tests wait on instead of a fixed sleep: a state of the code under test, with a deadline that
    is generous, because it only bounds a failing test and costs a passing one nothing."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)  # a poll interval, not a synchronization: the condition decides


@pytest.fixture
def wait_until() -> Callable[..., object]:
    """`wait_until(condition, timeout=60, what=...)`: poll a state with a deadline (never a bare sleep)."""
    return _wait_until

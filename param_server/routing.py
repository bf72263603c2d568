"""Where a client sends each request: the partition map it routes by, and the address each shard
has now (DESIGN §4.1 map epochs, docs/reliability.md §6 failover).

A shard is known by a key, its first address. A restarted shard comes back at a new address with
the same partitions; once a newer map names it (installed from outside with `install`, e.g. by the
driver, or fetched here from the other shards) requests for the key go to the new address. Lookups
re-run under `rerouting`; pushes re-send the same request (same seq) with `call`, so the shard, which
replayed its log, applies each push once. A stale-epoch answer (FAILED_PRECONDITION) refreshes the map.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from param_server import fanout
from param_server.errors import ShardClosedError, StaleEpochError
from param_server.fanout import ClientConfig
from param_server.partition_map import PartitionMap

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Routing:
    """A client's partition map and shard addresses; safe to use from the client's threads."""

    def __init__(self, net: fanout.ShardChannels, config: ClientConfig, pmap: PartitionMap) -> None:
        self._net = net
        self.config = config
        self._lock = threading.Lock()
        self._alias: dict[str, str] = {}  # address of a restarted shard -> its key
        self._current: dict[str, str] = {}  # key -> the shard's address now (absent: the key itself)
        self.pmap = pmap
        for address in pmap.addresses:
            net.open(address)

    def install(self, new: PartitionMap) -> bool:
        """Route by `new` if its epoch is newer than ours; returns whether it was installed.

        An address of the old map that is gone, whose partitions are now all owned by an address the
        old map did not have, is a restarted shard: pushes to the new address continue on the same
        ordered sender with the same seq numbering (the shard replayed its log up to them).
        """
        with self._lock:
            old = self.pmap
            if new.epoch <= old.epoch:
                return False
            for i, a in enumerate(old.addresses):
                parts = np.flatnonzero(old.owner == i)
                if a in new.addresses or not parts.size:
                    continue
                for j, b in enumerate(new.addresses):
                    if b not in old.addresses and np.array_equal(np.flatnonzero(new.owner == j), parts):
                        key = self.key(a)
                        self._alias[b] = key
                        self._current[key] = b
                        logger.info("shard at %s is now at %s (epoch %d)", a, b, new.epoch)
                        break
            for address in new.addresses:
                self._net.open(address)
            self.pmap = new
            return True

    def key(self, address: str) -> str:
        """The key of the shard at `address` (its first address): seqs and the push sender go by it."""
        return self._alias.get(address, address)

    def refresh(self) -> None:
        """Ask the known shards for their map; install the newest."""
        new = self._net.newest_map(self.pmap.addresses)
        if new is None:
            raise StaleEpochError("no shard answered GetPartitionMap", self.pmap.epoch)
        self.install(new)

    def rerouting(self, attempt: Callable[[], T]) -> T:
        """Run an idempotent lookup; on a stale-epoch answer refresh the map and run it again; on a dead
        shard (UNAVAILABLE after the retries) wait for a newer map (its replacement) and run it again."""
        refreshes, deadline = 0, None
        while True:
            epoch = self.pmap.epoch
            try:
                return attempt()
            except StaleEpochError as err:
                if refreshes >= self.config.max_map_refreshes:
                    raise
                refreshes += 1
                logger.info("partition map epoch %d is stale (%s); refreshing", self.pmap.epoch, err)
                self.refresh()
            except ShardClosedError as err:
                deadline = deadline or time.monotonic() + self.config.failover_timeout_s
                logger.warning("%s; waiting for the shard to come back", err)
                if not self.await_map(lambda e=epoch: self.pmap.epoch > e, None, deadline):
                    raise

    def call(self, key: str, method: str, build: Callable[[int], Any], epoch: int) -> Any:
        """On the sender thread of shard `key`: send build(epoch) to its current address. If that
        address is dead, wait (up to failover_timeout_s) for the map that moves the shard elsewhere and
        send the same request (same seq) there, routed with the newer epoch (the partitions are the same)."""
        deadline = None
        while True:
            address = self._current.get(key, key)
            try:
                return self._net.unary(address, method, build(epoch), retry=fanout.PUSH_RETRY)
            except ShardClosedError as err:
                deadline = deadline or time.monotonic() + self.config.failover_timeout_s
                logger.warning("%s; waiting for the shard to come back", err)
                if not self.await_map(lambda a=address: self._current.get(key, key) != a, address, deadline):
                    raise
                epoch = max(epoch, self.pmap.epoch)

    def await_map(self, done: Callable[[], bool], dead: str | None, deadline: float) -> bool:
        """Wait until `done()` holds, installing newer maps (from `install` called from outside, or
        fetched here from the shards other than `dead`). False at the deadline."""
        while True:
            pmap = self.pmap
            if done():
                return True
            if time.monotonic() >= deadline:
                return False
            others = [a for a in pmap.addresses if a != dead]
            new = self._net.newest_map(others) if others else None
            if new is not None and new.epoch > pmap.epoch:
                self.install(new)
                continue
            time.sleep(0.2)

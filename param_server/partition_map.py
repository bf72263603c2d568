"""The partition map: partition -> shard, plus an epoch (DESIGN §4.1).

Row r lives in partition r % NP; the map says which shard (an index into `addresses`) owns each
partition. Rescaling moves whole partitions and bumps the epoch; a client that routed with an
older epoch gets FAILED_PRECONDITION and refreshes. Plain data, no gRPC: the client routes with
it, the server answers GetPartitionMap with it, the coordinator builds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from param_server.errors import InvalidRequestError, WrongShardError

UNOWNED = -1  # owner of a partition no known shard holds


@dataclass(frozen=True)
class PartitionMap:
    """Which shard owns each partition. `owner` int32 [NP] indexes `addresses`; -1 = unowned."""

    epoch: int
    addresses: tuple[str, ...]
    owner: np.ndarray = field(repr=False)  # int32 [num_partitions]

    def __post_init__(self) -> None:
        owner = np.asarray(self.owner, dtype=np.int32).copy()
        owner.flags.writeable = False
        object.__setattr__(self, "owner", owner)
        object.__setattr__(self, "addresses", tuple(self.addresses))
        if owner.ndim != 1 or owner.size == 0:
            raise InvalidRequestError(f"partition map: owner must be a non-empty 1-D array, got {owner.shape}")
        if owner.size and (owner.min() < UNOWNED or owner.max() >= len(self.addresses)):
            raise InvalidRequestError(
                f"partition map: owners must be in [-1, {len(self.addresses)}), got {owner.min()}..{owner.max()}"
            )
        if self.epoch < 0:
            raise InvalidRequestError(f"partition map: epoch must be >= 0, got {self.epoch}")

    @property
    def num_partitions(self) -> int:
        """NP."""
        return int(self.owner.size)

    @classmethod
    def from_owned(
        cls, addresses: Sequence[str], owned: Sequence[Iterable[int]], num_partitions: int, epoch: int = 0
    ) -> PartitionMap:
        """Build from each shard's owned partitions (owned[i] belongs to addresses[i])."""
        owner = np.full(num_partitions, UNOWNED, dtype=np.int32)
        for index, parts in enumerate(owned):
            parts = np.fromiter(parts, dtype=np.int64)
            if parts.size and (parts.min() < 0 or parts.max() >= num_partitions):
                raise InvalidRequestError(f"partition map: shard {index} owns partitions outside [0, {num_partitions})")
            clash = parts[owner[parts] != UNOWNED]
            if clash.size:
                raise InvalidRequestError(f"partition map: partitions {clash[:8].tolist()} owned by two shards")
            owner[parts] = index
        return cls(epoch=epoch, addresses=tuple(addresses), owner=owner)

    @classmethod
    def round_robin(cls, addresses: Sequence[str], num_partitions: int, epoch: int = 0) -> PartitionMap:
        """Partition p -> shard p % S (the default layout for S shards)."""
        owner = np.arange(num_partitions, dtype=np.int32) % len(addresses)
        return cls(epoch=epoch, addresses=tuple(addresses), owner=owner)

    def partitions_of(self, shard: int) -> list[int]:
        """Partitions owned by shard index `shard`, ascending."""
        return np.nonzero(self.owner == shard)[0].tolist()

    def route(self, rows: np.ndarray) -> np.ndarray:
        """rows int64 [U] -> owning shard index int32 [U]; WrongShardError if a partition is unowned."""
        shards = self.owner[np.asarray(rows, dtype=np.int64) % self.num_partitions]
        if shards.size and shards.min() < 0:
            bad = np.asarray(rows)[shards < 0][:8].tolist()
            raise WrongShardError(f"rows {bad} live in partitions no known shard owns (map epoch {self.epoch})")
        return shards

    def with_epoch(self, epoch: int) -> PartitionMap:
        """A copy with another epoch."""
        return PartitionMap(epoch=epoch, addresses=self.addresses, owner=self.owner)


def parse_partitions(text: str, num_partitions: int) -> list[int]:
    """"0-127" or "0,2,4-7" -> sorted unique partition ids, each in [0, num_partitions)."""
    parts: set[int] = set()
    for piece in text.split(","):
        piece = piece.strip()
        if not piece:
            continue
        try:
            if "-" in piece:
                lo, hi = (int(x) for x in piece.split("-", 1))
                if hi < lo:
                    raise ValueError
                parts.update(range(lo, hi + 1))
            else:
                parts.add(int(piece))
        except ValueError:
            raise InvalidRequestError(f"bad partition range {piece!r} (expected e.g. 0-127 or 0,2,4)") from None
    if not parts:
        raise InvalidRequestError(f"no partitions in {text!r}")
    out = sorted(parts)
    if out[0] < 0 or out[-1] >= num_partitions:
        raise InvalidRequestError(f"partitions {text!r} outside [0, {num_partitions})")
    return out

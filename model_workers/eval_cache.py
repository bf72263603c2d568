"""Eval-time memo of tensors derived from parameters and buffers (DESIGN §6 serving).

While a model serves, a memory layer's sub-keys and query statistics do not change, yet every decode
step would rebuild the same things from them: the L2-normed sub-keys in the [d_k, H·n·r] layout of
the score matmul (two 4 MiB copies per step at K = 4096, the part of a decode step that grew with
the table) and the Cholesky factor of the whitening covariance. `EvalCache` keeps such derived
tensors between forwards and recomputes one as soon as any tensor it was made from changes.

An entry is keyed by the storage address, shape, dtype, device and **version counter** of every
source tensor. PyTorch bumps a tensor's version on each in-place write, so an optimizer step
(`param.add_`, foreach ops), `load_state_dict` (`param.copy_`) and a running-statistics update
(`lerp_`) all make the next lookup miss; replacing `param.data` changes the address. On top of
that, the owner clears its cache on `train()` / `eval()` and on `load_state_dict`.

The cache is only consulted where it cannot change results: in eval mode, and never while autograd
would need a graph back to the sources (a cached tensor carries none). The cached value is computed
by the same operations as the uncached path, so outputs are bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")


def _fingerprint(sources: Sequence[Tensor]) -> tuple[Hashable, ...]:
    return tuple((s.data_ptr(), s._version, tuple(s.shape), s.dtype, s.device) for s in sources)


class EvalCache:
    """Named entries, each a value made from `sources` and valid while none of them changed."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[tuple[Hashable, ...], object]] = {}
        self.misses = 0  # entries (re)computed: a test and a curious operator can see it work

    @staticmethod
    def usable(owner: nn.Module, sources: Sequence[Tensor]) -> bool:
        """Whether `owner` may use cached values now: eval mode, and no gradient wanted by a source."""
        if owner.training:
            return False
        return not (torch.is_grad_enabled() and any(s.requires_grad for s in sources))

    def get(self, name: Hashable, sources: Sequence[Tensor], make: Callable[[], T]) -> T:
        """The entry `name` made by `make()` (under no_grad) from `sources`; recomputed if any changed."""
        key = _fingerprint(sources)
        hit = self._entries.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]  # type: ignore[return-value]
        with torch.no_grad():
            value = make()
        self._entries[name] = (key, value)
        self.misses += 1
        return value

    def clear(self) -> None:
        """Forget every entry (the owner's parameters are about to change, or it starts training)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class EvalCached(nn.Module):
    """An nn.Module with an `EvalCache` (`self.eval_cache`) that is cleared on train()/eval() and on
    load_state_dict, as a second guard beside the version keys."""

    def __init__(self) -> None:
        super().__init__()
        self.eval_cache = EvalCache()

    def train(self, mode: bool = True) -> EvalCached:
        self.eval_cache.clear()
        return super().train(mode)

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        self.eval_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]

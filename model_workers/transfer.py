"""Device <-> host copies of the memory path: the one place where a worker's step syncs the device.

A memory layer computes its indices and scores on the worker's device (a GPU, or the CPU), while
the value tables live on the host side of a `ValueBackend` (in-process numpy or shards over gRPC).
Per memory layer and training step the path makes exactly:

- forward: one device-to-host copy: rows mode the unique physical rows [U] (made unique on the
  device), pooled mode the rows, projectors [n] and scores [n, h] packed into one buffer;
- backward: one device-to-host copy: rows mode the unique rows and their gradients [U, d_v]
  together (`MemoryLayer.pending_table_grads`; with pre-values the P_tab gradients ride along),
  pooled mode dL/do [T, E, d_v];
- pooled mode with pre-values (UltraMemV2) adds two: the worker fetches the selected P_tab rows in
  the forward (the shards do not score pre-values yet) and sends their gradients after backward;
- answers (values, partial sums, dL/ds) go back to the device with non_blocking copies from pinned
  host buffers; a lookup answered on a lookup thread is copied on a side stream, and the layer's
  compute stream waits for it with an event only where it needs the values.

Host buffers are exact-size views of staging buffers (`HostStaging`, one per layer) that are reused
step after step and grow only when a step needs more bytes; on CUDA they are pinned (page-locked),
so copies from them run asynchronously. On the CPU the same code runs: the "copies" are memcpys
into the staging buffers and the answers are used in place.

Every device-to-host copy of the path goes through `device_to_host`, and the step's scalars
(loss, aux loss, gradient norm) through `read_scalars`: one counted choke point, so a test can
assert how often a step syncs (tests/model_workers/test_host_syncs.py). torch.unique on CUDA
also waits for its own count (the size of the copy that follows); that wait is not counted.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future

import torch
from torch import Tensor

_ALIGN = 8  # bytes: every part of a packed buffer starts at a multiple of the widest element (int64)


def _layout(parts: Sequence[Tensor]) -> tuple[list[int], int]:
    """Byte offset of each part in a packed buffer (8-aligned, so each view is well aligned) and the total."""
    offsets, total = [], 0
    for p in parts:
        total = -(-total // _ALIGN) * _ALIGN
        offsets.append(total)
        total += p.numel() * p.element_size()
    return offsets, total


def device_to_host(parts: Sequence[Tensor], out: Tensor) -> None:
    """THE device-to-host copy of the memory path: pack `parts` (one device) into the host byte
    buffer `out` (uint8 [packed size], pinned on CUDA) with one copy, and wait for it.

    On an accelerator the parts are packed into one device buffer first (device-side copies, no
    sync), then copied to the host once; on the CPU they are copied straight into `out`.
    """
    offsets, total = _layout(parts)
    assert out.dtype == torch.uint8 and out.numel() == total and out.device.type == "cpu"
    device = parts[0].device if parts else out.device
    packed = out if device.type == "cpu" else torch.empty(total, dtype=torch.uint8, device=device)
    for p, start in zip(parts, offsets, strict=True):
        flat = p.detach().reshape(-1)
        packed[start : start + flat.numel() * flat.element_size()].copy_(flat.view(torch.uint8))
    if packed is not out:
        out.copy_(packed)  # blocking: the one wait for the device (a copy into pinned memory is a DMA)


def read_scalars(*values: Tensor) -> list[float]:
    """The step's scalars (0-D tensors on one device) read in one device-to-host copy -> floats."""
    device = values[0].device  # (a scalar made elsewhere, e.g. a norm over no gradients, joins it)
    stacked = torch.stack([v.detach().float().reshape(()).to(device) for v in values])  # (k,)
    out = torch.empty(stacked.numel() * stacked.element_size(), dtype=torch.uint8)
    device_to_host([stacked], out)
    return out.view(torch.float32).tolist()


class Arrival:
    """A value that was copied to the device on a side stream: `get` makes the current stream wait
    for the copy (an event, no host sync) and returns the tensor; on the CPU it is the value itself."""

    def __init__(self, value: Tensor, ready: torch.cuda.Event | None = None) -> None:
        self._value, self._ready = value, ready

    def get(self) -> Tensor:
        if self._ready is not None:
            stream = torch.cuda.current_stream(self._value.device)
            stream.wait_event(self._ready)
            self._value.record_stream(stream)  # allocated on the side stream, used on this one
        return self._value


class HostStaging:
    """A memory layer's reusable host buffers, one per purpose (`key`), pinned when the device is CUDA.

    `to_host` hands out exact-size views of a buffer; they stay valid until the next `to_host` with
    the same key (the next step of the layer), so a caller that keeps data longer copies it. A buffer
    grows (to the size asked) when a step needs more bytes and is otherwise never re-allocated.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._copied: dict[str, torch.cuda.Event] = {}  # last H2D copy out of a pinned buffer, per key
        self._side: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()  # answers may be staged on lookup threads
        self.allocations = 0  # buffers (re)allocated so far: stays flat once the sizes are reached

    def __reduce__(self) -> tuple[type[HostStaging], tuple[()]]:
        """A copied or pickled layer gets empty buffers of its own (a lock and pinned memory do not travel)."""
        return HostStaging, ()

    def _buffer(self, key: str, nbytes: int, pin: bool) -> Tensor:
        """uint8 [nbytes]: a view of the staging buffer `key`, grown if it is too small."""
        with self._lock:
            buf = self._buffers.get(key)
            if buf is None or buf.numel() < nbytes or buf.is_pinned() != pin:
                buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
                self._buffers[key] = buf
                self.allocations += 1
            return buf[:nbytes]

    def to_host(self, key: str, *parts: Tensor) -> list[Tensor]:
        """Device tensors -> host tensors of the same dtypes and shapes, in one copy (`device_to_host`)."""
        offsets, total = _layout(parts)
        pin = bool(parts) and parts[0].device.type == "cuda"
        out = self._buffer(key, total, pin)
        device_to_host(parts, out)
        return [out[start : start + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
                for p, start in zip(parts, offsets, strict=True)]

    def to_device(self, key: str, host: Tensor, device: torch.device) -> Tensor:
        """A host answer -> the device, non_blocking from a pinned buffer on CUDA (enqueued on the
        current stream); on the CPU the answer itself (backends hand over fresh tensors)."""
        if device.type != "cuda":
            return host.to(device)
        self._wait_copied(key)  # the previous copy out of this buffer must be done before refilling it
        nbytes = host.numel() * host.element_size()
        staged = self._buffer(key, nbytes, pin=True).view(host.dtype).view(host.shape)
        staged.copy_(host)  # host memcpy into page-locked memory
        out = staged.to(device, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        with self._lock:
            self._copied[key] = done
        return out

    def to_device_async(self, key: str, answer: Future[Tensor], device: torch.device) -> Future[Arrival]:
        """When `answer` (a host tensor, e.g. a lookup on a lookup thread) arrives, copy it to the
        device on a side stream (CUDA) so the copy overlaps the dense blocks; -> an `Arrival`."""
        arrived: Future[Arrival] = Future()

        def copy(done: Future[Tensor]) -> None:
            try:
                host = done.result()
                if device.type != "cuda":
                    arrived.set_result(Arrival(host.to(device)))
                    return
                with torch.cuda.stream(self._side_stream(device)):
                    value = self.to_device(key, host, device)
                    ready = torch.cuda.Event()
                    ready.record()
                arrived.set_result(Arrival(value, ready))
            except BaseException as err:  # delivered where the layer waits, as the lookup's own error
                arrived.set_exception(err)

        answer.add_done_callback(copy)
        return arrived

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        with self._lock:
            if device not in self._side:
                self._side[device] = torch.cuda.Stream(device)
            return self._side[device]

    def _wait_copied(self, key: str) -> None:
        with self._lock:
            done = self._copied.pop(key, None)
        if done is not None:
            done.synchronize()  # normally long finished: the layer has used the values since

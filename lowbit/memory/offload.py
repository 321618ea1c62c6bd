"""Activation offload: tensors autograd saves in a decoder layer live in pinned CPU memory until backward.

As in MEMO (arXiv 2407.12117) and torchtune's OffloadActivations: `saved_tensors_hooks` intercept every
tensor a layer's forward saves for backward. `pack` starts a device-to-host copy on a side CUDA stream
into pinned memory and lets the GPU copy go (the caching allocator may reuse it once the copy is done:
`record_stream`). In backward, the first `unpack` from layer L brings layer L back (if it is not already
there) and starts the host-to-device copies of the layer run just before it in forward (prefetch one
layer ahead), so the copy of L-1 overlaps the backward of L.

Tensors below `min_bytes`, and those that are not dense (overlapping or gapped strides), stay where
they are. Parameters stay too: a saved weight is alive anyway.

Without CUDA the same hooks run with plain CPU tensors: `pack` copies into a fresh CPU tensor and
`unpack` returns it (no memory is saved; the path exists so tests exercise the hooks). `apply` logs
this fallback once.
"""
from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

import torch
from torch import nn


def is_dense(tensor: torch.Tensor) -> bool:
    """Whether the elements fill their storage span exactly once (a permutation of a contiguous layout)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(tensor.size(), tensor.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


@dataclass(eq=False)
class OffloadedTensor:
    """What autograd keeps instead of a saved activation: the host copy and when it is ready."""

    host: torch.Tensor                       # pinned CPU copy (same size, strides, dtype)
    device: torch.device                     # where the activation lived and must return to
    layer_call: int                          # which offloaded-layer forward call saved it (forward order)
    copied: torch.cuda.Event | None = None   # device-to-host copy finished
    fetched: torch.Tensor | None = None      # device copy brought back by a prefetch
    fetched_ready: torch.cuda.Event | None = None


class ActivationOffloader:
    """Saved-tensor hooks shared by every offloaded layer of one model (one side stream, one registry).

    `layer_context()` returns the hooks context a layer's forward runs under.
    """

    def __init__(self, device: torch.device, min_bytes: int = 1 << 20, max_inflight_bytes: int = 1 << 30):
        self.device = device
        # A freed activation's memory is reusable only once its copy has read it, and the host enqueues
        # forward far ahead of the copies: without a bound, the GPU would hold every activation anyway.
        self.max_inflight_bytes = max_inflight_bytes
        self.inflight: collections.deque[tuple[torch.cuda.Event, int]] = collections.deque()
        self.inflight_bytes = 0
        self.min_bytes = min_bytes
        self.use_cuda, self.stream = False, None
        if device.type == "cuda":
            self._use_cuda(device)
        self.calls = itertools.count()
        self.current_call: int | None = None
        self.backward_call: int | None = None                  # the layer call backward is unpacking now
        self.waiting: dict[int, list[OffloadedTensor]] = {}    # layer call -> its tensors still on the host
        self.bytes_offloaded = 0

    def _use_cuda(self, device: torch.device) -> None:
        """Offload to pinned host memory from `device` on a side stream."""
        self.device, self.use_cuda, self.stream = device, True, torch.cuda.Stream(device)

    # ---- forward ------------------------------------------------------------------------------------
    def begin_layer(self) -> None:
        self.current_call = next(self.calls)

    def pack(self, tensor: torch.Tensor):
        if tensor.is_cuda and not self.use_cuda and self.current_call is not None:
            self._use_cuda(tensor.device)        # memory.apply ran before the model moved to the GPU
        if (self.current_call is None or isinstance(tensor, nn.Parameter)
                or tensor.numel() * tensor.element_size() < self.min_bytes
                or tensor.device.type != self.device.type or not is_dense(tensor)):
            return tensor
        host = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device="cpu",
                                   pin_memory=self.use_cuda)
        handle = OffloadedTensor(host=host, device=tensor.device, layer_call=self.current_call)
        if self.use_cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))   # the activation is written
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
                handle.copied = torch.cuda.Event()
                handle.copied.record(self.stream)
            tensor.record_stream(self.stream)    # its memory is reused only after the copy has read it
            self._throttle(handle.copied, host.numel() * host.element_size())
        else:
            host.copy_(tensor)
        self.waiting.setdefault(self.current_call, []).append(handle)
        self.bytes_offloaded += host.numel() * host.element_size()
        return handle

    def _throttle(self, copied: torch.cuda.Event, size: int) -> None:
        """Wait (on the host) for the oldest copies while more than max_inflight_bytes are still in flight."""
        self.inflight.append((copied, size))
        self.inflight_bytes += size
        while self.inflight and (self.inflight_bytes > self.max_inflight_bytes or self.inflight[0][0].query()):
            event, done = self.inflight.popleft()
            event.synchronize()
            self.inflight_bytes -= done

    # ---- backward -----------------------------------------------------------------------------------
    def unpack(self, packed):
        if not isinstance(packed, OffloadedTensor):
            return packed
        if packed.layer_call != self.backward_call:  # backward has entered a new layer
            self.backward_call = packed.layer_call
            self._fetch(packed.layer_call)           # a no-op when it was prefetched
            earlier = [call for call in self.waiting if call < packed.layer_call]
            if earlier:
                self._fetch(max(earlier))            # prefetch exactly one layer ahead, once per layer
        if packed.fetched is None:                   # unpacked a second time (retain_graph): fetch it alone
            self._fetch_one(packed)
        tensor, ready = packed.fetched, packed.fetched_ready
        packed.fetched, packed.fetched_ready = None, None   # autograd owns it now; freed when it is done
        if self.use_cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            tensor.record_stream(current)
        return tensor

    def _fetch(self, layer_call: int) -> None:
        for handle in self.waiting.pop(layer_call, []):
            self._fetch_one(handle)

    def _fetch_one(self, handle: OffloadedTensor) -> None:
        if not self.use_cuda:
            handle.fetched = handle.host.clone()   # a copy: autograd may not share the stored buffer
            return
        with torch.cuda.stream(self.stream):
            device_copy = torch.empty_strided(handle.host.size(), handle.host.stride(), dtype=handle.host.dtype,
                                              device=handle.device)
            device_copy.copy_(handle.host, non_blocking=True)   # same stream as the D2H copy: ordered after it
            handle.fetched_ready = torch.cuda.Event()
            handle.fetched_ready.record(self.stream)
        handle.fetched = device_copy

    def layer_context(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def offload_layer(layer: nn.Module, offloader: ActivationOffloader) -> None:
    """Run `layer`'s forward under the offload hooks (forward pre/post hooks; names and keys unchanged)."""
    contexts: list = []

    def enter(module, args, kwargs):
        if torch.is_grad_enabled():
            offloader.begin_layer()
            context = offloader.layer_context()
            context.__enter__()
            contexts.append(context)

    def leave(module, args, kwargs, output):
        if contexts:
            contexts.pop().__exit__(None, None, None)
            offloader.current_call = None

    layer.register_forward_pre_hook(enter, with_kwargs=True)
    layer.register_forward_hook(leave, with_kwargs=True, always_call=True)

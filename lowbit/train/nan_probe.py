"""Where a NaN/Inf gradient starts: LOWBIT_NAN_PROBE=1 (a diagnosis aid for eager runs, model.compile=false).

Every module's floating-point inputs get a gradient hook; the first gradient that is not finite, in backward
order, names the module whose *input* it is, i.e. the first place the backward produced it. Each module's
largest forward input magnitude is kept on the device (no synchronisation) and reported with it: a huge but
finite activation (an RMSNorm's square overflowing float32, say) shows there. One synchronisation per hook:
slow, for diagnosis only.
"""
from __future__ import annotations

import functools

import torch
from torch import nn


class NanProbe:
    def __init__(self, model: nn.Module):
        self.first: str | None = None
        self.amax: dict[str, torch.Tensor] = {}
        for name, module in model.named_modules():
            if name:
                module.register_forward_pre_hook(functools.partial(self._inputs, name), with_kwargs=True)

    def _inputs(self, name, module, args, kwargs):
        tensors = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t) and t.is_floating_point()]
        for index, t in enumerate(tensors):
            self.amax[f"{name}[{index}]"] = t.detach().abs().amax().float()
            if t.requires_grad:
                t.register_hook(functools.partial(self._gradient, f"{name}[{index}]"))

    def _gradient(self, where: str, grad: torch.Tensor) -> None:
        if self.first is None and not bool(torch.isfinite(grad).all()):
            self.first = where

    def report(self) -> str:
        largest = sorted(self.amax.items(), key=lambda item: -float(item[1]))[:5]
        return (f"; LOWBIT_NAN_PROBE: first non-finite gradient at the input of {self.first}; largest forward "
                f"inputs: " + ", ".join(f"{k} {float(v):.3e}" for k, v in largest))

    def reset(self) -> None:
        self.first = None
        self.amax.clear()

"""Which modules a method converts: fnmatch patterns on module names (`model.layers.0.mlp.up_proj`)."""
from __future__ import annotations

import fnmatch
import logging

from torch import nn

log = logging.getLogger("lowbit")


def selected(name: str, include: list[str], exclude: list[str]) -> bool:
    """`name` matches one of `include` and none of `exclude`."""
    return any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def selected_linears(model: nn.Module, include: list[str], exclude: list[str], key: str) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every plain nn.Linear selected by the patterns; a pattern that matches no module of the
    model is logged under `key` (config prefix, e.g. precision) as a likely typo; none selected is an error."""
    names = [name for name, _ in model.named_modules()]
    for which, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                log.warning("%s.%s pattern %r matches no module of the model (names look like %r)", key, which,
                            pattern, next((n for n in names if ".layers." in n and n.endswith("proj")), names[-1]))
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and selected(name, include, exclude)]
    if not targets:
        raise ValueError(f"{key}.include={include} minus {key}.exclude={exclude} selects no nn.Linear of the model; "
                         f"fix the patterns (module names look like 'model.layers.0.mlp.up_proj')")
    return targets

"""Gate-only checkpoints: `gates.safetensors` (weights, keys `layers.N.<param>`) + `gate_config.json`.

The config records the gate's settings and the shape of the model it was trained on (layer count,
heads, head dim); `load_gates` refuses a checkpoint whose shape or block size does not match.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lowbit.objectives.seer_attach import attach_gates, gates, model_shape

FORMAT = "lowbit-seer-gate-v1"
WEIGHTS = "gates.safetensors"
CONFIG = "gate_config.json"


def save_gates(model: nn.Module, directory, state_dict: dict | None = None) -> Path:
    """Write the gates of `model` (float32) and their config to `directory`; return the directory.

    state_dict: the model's full state (plain tensors gathered from shards); the gate weights are read from
    it instead of the live, possibly sharded, gate modules."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gate_list = gates(model)
    if state_dict is None:
        state_dict = model.state_dict()
    prefixes = [name + "." for name, module in model.named_modules() if module in gate_list]   # layer order
    tensors = {f"layers.{i}.{key[len(prefix):]}": value.detach().float().cpu().contiguous()
               for i, prefix in enumerate(prefixes) for key, value in state_dict.items() if key.startswith(prefix)}
    save_file(tensors, str(directory / WEIGHTS))
    config = {"format": FORMAT, "model": model_shape(model), "gate": gate_list[0].describe(),
              "threshold": gate_list[0].controller.threshold}
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    return directory


def read_gate_config(directory) -> dict:
    path = Path(directory) / CONFIG
    if not path.is_file() or not (Path(directory) / WEIGHTS).is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a gate checkpoint (needs {WEIGHTS} and {CONFIG}); pass "
                                f"the run's gates directory, e.g. runs/seer_gate/gates")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} has format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def load_gates(model: nn.Module, directory, *, block_size: int | None = None, use_triton: str = "auto"):
    """Attach the checkpoint's gates to `model` (the base model it was trained on) and return the controller.

    Raises ValueError naming the mismatch when the checkpoint was trained on another model shape, or
    with another block size than `block_size` (when given).
    """
    from safetensors.torch import load_file

    config = read_gate_config(directory)
    expected, found = config["model"], model_shape(model)
    for key in ("num_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
        if expected[key] != found[key]:
            raise ValueError(f"gate checkpoint {str(directory)!r} was trained on a model with {key}={expected[key]}, "
                             f"but this model has {key}={found[key]}; load it onto the model it was trained on "
                             f"({expected.get('model_type')}, {expected['num_layers']} layers)")
    gate_cfg = config["gate"]
    if block_size is not None and block_size != gate_cfg["block_size"]:
        raise ValueError(f"gate checkpoint {str(directory)!r} uses block_size={gate_cfg['block_size']}, but "
                         f"block_size={block_size} was requested; set objective.seer.block_size="
                         f"{gate_cfg['block_size']} or train gates for {block_size}")
    controller = attach_gates(model, block_size=gate_cfg["block_size"], gate=gate_cfg["gate"], heads=gate_cfg["heads"],
                              q_pool=gate_cfg["q_pool"], k_pool=gate_cfg["k_pool"],
                              threshold=config.get("threshold", 0.005), use_triton=use_triton)
    tensors = load_file(str(Path(directory) / WEIGHTS))
    for i, gate in enumerate(gates(model)):
        state = {name[len(f"layers.{i}."):]: t for name, t in tensors.items() if name.startswith(f"layers.{i}.")}
        reference = next(gate.parameters())
        gate.load_state_dict({k: v.to(reference.device, reference.dtype) for k, v in state.items()}, strict=True)
    return controller


def base_weights_digest(model: nn.Module) -> str:
    """SHA-256 over the base model's parameters and buffers (gates excluded), in name order."""
    import hashlib

    digest = hashlib.sha256()
    state = {k: v for k, v in model.state_dict().items() if ".seer_gate." not in k}
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


__all__ = ["save_gates", "load_gates", "read_gate_config", "base_weights_digest"]

"""Atomic, validated checkpoints: `runs/<name>/checkpoints/step_XXXXXXXX/`.

A checkpoint is written into a temporary directory and renamed into place only when every file is
on disk, so a process killed mid-save (SIGKILL included) leaves the previous checkpoint as the
latest one. Loading reads and checks everything before it touches the model or the optimizer: a
corrupt or mismatched checkpoint is refused whole, never half-loaded.

Files: model.safetensors (weights, shared tensors stored once), optimizer.pt, state.pt (step and
trainer counters), rng_rank{r}.pt (each rank's RNG states), config.yaml, manifest.json (written
last). Non-weight files load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from lowbit.parallel import World, barrier

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (corrupt, incomplete or for another model)."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(path)


class Checkpointer:
    def __init__(self, run_dir: str | Path, world: World, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.world = world
        self.keep = keep

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary directories of interrupted saves are ignored)."""
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.iterdir() if p.name.startswith(PREFIX) and (p / "manifest.json").is_file()]
        return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
             config_yaml: str) -> Path:
        """Write the checkpoint of `step` atomically; every rank calls this."""
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f".tmp_{PREFIX}{step:08d}"
        if self.world.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():                      # left by a save that was killed
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier()
        torch.save(rng_state(), tmp / f"rng_rank{self.world.rank}.pt")
        if self.world.is_main:
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(dict(state, step=step), tmp / "state.pt")
            (tmp / "config.yaml").write_text(config_yaml)
        barrier()
        if self.world.is_main:
            manifest = {"format": FORMAT_VERSION, "step": step, "world_size": self.world.world_size,
                        "files": sorted(p.name for p in tmp.iterdir())}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            _fsync_tree(tmp)
            if final.exists():                    # an older save of the same step: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for old in self.all()[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Validate the checkpoint at `path` whole, then load it into `model` and `optimizer`."""
        path = Path(path)
        manifest = self._read_manifest(path)
        self._check_weights(path / "model.safetensors", model)
        try:
            optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            rng_file = path / f"rng_rank{self.world.rank}.pt"
            rng = torch.load(rng_file, weights_only=True) if rng_file.exists() else None
        except Exception as error:                # truncated or foreign pickle
            raise CheckpointError(f"checkpoint {path} is corrupt ({error}); delete it to resume from an "
                                  f"earlier one, or pass trainer.resume=none with a new run_name") from None
        self._check_optimizer(path, optimizer_state, optimizer)
        # Everything read and checked: only now touch the live objects.
        load_model(model, str(path / "model.safetensors"), strict=True)
        optimizer.load_state_dict(optimizer_state)
        if rng is not None and manifest["world_size"] == self.world.world_size:
            set_rng_state(rng)
        else:
            log.warning("checkpoint %s was written by %d ranks, this run has %d: RNG states not restored, "
                        "so the run continues correctly but not bit-identically",
                        path, manifest["world_size"], self.world.world_size)
        return state

    @staticmethod
    def _read_manifest(path: Path) -> dict:
        manifest_file = path / "manifest.json"
        if not manifest_file.is_file():
            raise CheckpointError(f"{path} is not a complete lowbit checkpoint (no manifest.json); pass "
                                  f"trainer.resume=auto to take the latest complete one")
        try:
            manifest = json.loads(manifest_file.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{manifest_file} is corrupt ({error}); delete {path}") from None
        missing = [f for f in manifest.get("files", []) if not (path / f).is_file()]
        if manifest.get("format") != FORMAT_VERSION or missing:
            raise CheckpointError(f"checkpoint {path} is incomplete or of another format "
                                  f"(format {manifest.get('format')}, missing {missing}); delete it")
        return manifest

    @staticmethod
    def _check_weights(file: Path, model: nn.Module) -> None:
        tensors = model.state_dict()
        expected = {name: tuple(t.shape) for name, t in tensors.items()}
        by_storage: dict[int, list[str]] = {}
        for name, tensor in tensors.items():
            by_storage.setdefault(tensor.data_ptr(), []).append(name)
        aliased = {n for names in by_storage.values() if len(names) > 1 for n in names}   # stored once
        try:
            with safe_open(str(file), framework="pt") as handle:
                stored = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        except Exception as error:
            raise CheckpointError(f"{file} is corrupt ({error}); delete its checkpoint directory") from None
        unknown = sorted(set(stored) - set(expected))
        missing = sorted(set(expected) - set(stored) - aliased)
        wrong = sorted(n for n in stored if n in expected and stored[n] != expected[n])
        if unknown or missing or wrong:
            shapes = [f"{n}: checkpoint {stored[n]} vs model {expected[n]}" for n in wrong[:5]]
            found = [f"{what} ({len(names)}): {listed[:5]}" for what, names, listed in (
                ("tensors the model lacks", unknown, unknown), ("tensors the checkpoint lacks", missing, missing),
                ("shape mismatches", wrong, shapes)) if names]
            raise CheckpointError(f"checkpoint {file.parent} belongs to another model: {'; '.join(found)}; resume "
                                  f"with the model config it was trained with, or start a new run_name")

    @staticmethod
    def _check_optimizer(path: Path, saved: dict, optimizer: torch.optim.Optimizer) -> None:
        live = optimizer.state_dict()
        sizes = [len(g["params"]) for g in saved.get("param_groups", [])]
        if sizes != [len(g["params"]) for g in live["param_groups"]]:
            raise CheckpointError(f"optimizer state in {path} holds parameter groups of sizes {sizes}, this run "
                                  f"has {[len(g['params']) for g in live['param_groups']]}: another model or "
                                  f"objective; resume with the config it was trained with")

"""Where metrics go: the console (rank 0, a progress bar on a terminal), metrics.jsonl, and W&B."""
from __future__ import annotations

import json
import time
import uuid
import logging
import math
import os
import sys
from pathlib import Path

from lowbit.config import LoggerConfig

log = logging.getLogger("lowbit")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


class ConsoleLogger:
    """A tqdm progress bar on a terminal; plain lines otherwise (CI logs, files)."""

    KEYS = ("loss", "lr", "grad_norm", "perf/tokens_per_s", "perf/mfu", "mem/peak_allocated_gib", "mem/peak_reserved_gib",
            "mem/peak_rss_gib")

    def __init__(self, max_steps: int, start_step: int):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, initial=start_step, dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        shown = {k.split("/")[-1]: _fmt(metrics[k]) for k in self.KEYS if k in metrics}
        if "val/loss" in metrics:
            line = f"step {step}: val loss {_fmt(metrics['val/loss'])}, perplexity {_fmt(metrics['val/perplexity'])}"
            self.bar.write(line) if self.bar else log.info(line)
            return
        if self.bar:
            self.bar.n = step
            self.bar.set_postfix(shown, refresh=True)
        else:
            log.info("step %d: %s", step, " ".join(f"{k}={v}" for k, v in shown.items()))

    def close(self) -> None:
        if self.bar:
            self.bar.close()


class JsonlLogger:
    def __init__(self, path: Path):
        self.handle = open(path, "a", buffering=1)

    def log(self, step: int, metrics: dict) -> None:
        self.handle.write(json.dumps({"step": step, "time": round(time.time(), 4), **metrics}) + "\n")

    def close(self) -> None:
        self.handle.close()


WANDB_MODES = ("offline", "online", "disabled")


class WandbLogger:
    """W&B run named after the run directory; the id is kept there so a resumed run continues it."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise ImportError("logger.backends includes wandb but wandb is not installed: pip install wandb, "
                              "or drop wandb from logger.backends") from None
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
        self.run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=run_name, id=run_id,
                              resume="allow", mode=cfg.wandb.mode, tags=list(cfg.wandb.tags), config=config,
                              dir=cfg.wandb.dir or str(run_dir))

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Fan metrics out to the configured backends, on rank 0 only."""

    def __init__(self, cfg: LoggerConfig, *, enabled: bool, run_dir: Path, run_name: str, config: dict,
                 max_steps: int, start_step: int):
        self.backends = []
        unknown = set(cfg.backends) - {"console", "jsonl", "wandb"}
        if unknown:
            raise ValueError(f"logger.backends has unknown entries {sorted(unknown)}; use console, jsonl, wandb")
        if "wandb" in cfg.backends and cfg.wandb.mode not in WANDB_MODES:
            raise ValueError(f"logger.wandb.mode={cfg.wandb.mode!r} is not known; use one of {list(WANDB_MODES)} "
                             f"(offline: write locally, `wandb sync` later)")
        if not enabled:
            return
        if "console" in cfg.backends:
            self.backends.append(ConsoleLogger(max_steps, start_step))
        if "jsonl" in cfg.backends:
            self.backends.append(JsonlLogger(run_dir / "metrics.jsonl"))
        if "wandb" in cfg.backends:
            os.environ.setdefault("WANDB_SILENT", "true")
            self.backends.append(WandbLogger(cfg, run_dir, run_name, config))

    def log(self, step: int, metrics: dict) -> None:
        for backend in self.backends:
            backend.log(step, metrics)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()

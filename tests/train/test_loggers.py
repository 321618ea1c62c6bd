"""W&B logging for real (offline mode, no network): the run, its config and its metric history."""
import json

from lowbit.train.run import run
from tests.conftest import compose


def test_wandb_offline_run_records_config_and_metrics(tiny_overrides, tmp_path):
    run(compose(tiny_overrides + ["logger=wandb", "logger.backends=[jsonl,wandb]", "trainer.max_steps=3",
                                  "trainer.export=false", "logger.wandb.tags=[test]"]))
    run_dir = tmp_path / "run"
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    files = {p.name for p in offline[0].rglob("*")}
    assert any(name.endswith(".wandb") for name in files), files
    # The run file is W&B's binary record log; each logged value is stored as its JSON text.
    blob = next(offline[0].rglob("*.wandb")).read_bytes()
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3
    for value in losses + [rows[0]["val/loss"]]:
        assert json.dumps(value).encode() in blob, value
    assert b"llama_tiny" in blob and b"test" in blob          # the resolved config and the tags


def test_unknown_backends_and_wandb_modes_name_the_fix(tmp_path):
    import pytest
    from omegaconf import OmegaConf

    from lowbit.config import LoggerConfig
    from lowbit.train.loggers import Loggers

    cfg = OmegaConf.structured(LoggerConfig(backends=["jsonl", "wandb"]))
    cfg.wandb.mode = "bogus"
    with pytest.raises(ValueError, match=r"logger.wandb.mode='bogus' is not known; use one of \['offline'"):
        Loggers(cfg, enabled=True, run_dir=tmp_path, run_name="x", config={}, max_steps=1, start_step=0)
    cfg.backends = ["tensorboard"]
    with pytest.raises(ValueError, match=r"logger.backends has unknown entries \['tensorboard'\]"):
        Loggers(cfg, enabled=True, run_dir=tmp_path, run_name="x", config={}, max_steps=1, start_step=0)

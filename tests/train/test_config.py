"""Every preset and config group composes onto the typed schema; bad keys and types fail clearly."""
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from tests.conftest import CONF, ROOT, compose

GROUPS = ["model", "data", "precision", "objective", "optim", "memory", "parallel", "logger", "trainer"]


@pytest.mark.parametrize("exp", sorted(p.stem for p in (CONF / "exp").glob("*.yaml")))
def test_every_preset_composes(exp):
    cfg = compose([f"+exp={exp}"])
    assert cfg.exp == exp


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_group_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    assert group in cfg


def test_unknown_key_and_wrong_type_are_refused():
    with pytest.raises(ConfigCompositionException, match="foo"):
        compose(["trainer.foo=1"])
    with pytest.raises(Exception, match="max_steps"):
        compose(["trainer.max_steps=many"])


def test_cli_help_and_cfg_job_show_the_composed_config():
    out = subprocess.run([sys.executable, "train.py", "+exp=bf16_llama", "--cfg", "job"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "name: llama_1b" in out.stdout and "seq_len: 4096" in out.stdout
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "exp" in out.stdout and "trainer" in out.stdout

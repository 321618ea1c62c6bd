"""The real trainer (tests/conftest.py `compose` + lowbit.train.run) with every recipe on llama_tiny:
the loss falls, the export is a plain HF model, and an fp8_rowwise run resumed from its checkpoint
equals the uninterrupted run bit for bit."""
import json
import logging

import pytest
import torch

from lowbit.train.run import run
from tests.conftest import compose

RECIPES = [["precision=fp8_tensorwise"], ["precision=fp8_rowwise", "precision.grad_format=e5m2"],
           ["precision=fp8_blockwise", "precision.block_size=32"], ["precision=fp4_vectorwise"],
           ["precision=fp4_vectorwise", "precision.dge=false", "precision.occ=false", "precision.asymmetric=true"],
           ["precision=nvfp4"], ["precision=mxfp4"]]


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, rows


@pytest.mark.slow
@pytest.mark.parametrize("overrides", RECIPES, ids=lambda o: "-".join(x.split("=")[1] for x in o))
def test_every_recipe_trains_with_falling_loss(tiny_overrides, tmp_path, overrides):
    from transformers import AutoModelForCausalLM

    run(compose(tiny_overrides + overrides + ["trainer.max_steps=8", "trainer.save_every=-1",
                                              "precision.stats_every=4"]))
    by_step, rows = losses(tmp_path / "run")
    assert len(by_step) == 8 and by_step[8] < by_step[1] - 0.1, by_step
    stats = [k for k in rows[-1] if k.startswith("quant/")] or [k for r in rows for k in r if k.startswith("quant/")]
    assert any(k.endswith("x/sqnr_db") for k in stats) and any("mlp.down_proj" in k for k in stats)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export")
    assert type(exported.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert torch.isfinite(exported(input_ids=torch.randint(0, 1000, (1, 8))).logits).all()


def test_conversion_follows_include_exclude_patterns(tiny_overrides, caplog):
    from lowbit import precision
    from lowbit.models.load import load
    from lowbit.precision.linear import QuantLinear

    cfg = compose(tiny_overrides + ["precision=fp8_rowwise", "precision.exclude=[*lm_head*,*down_proj*]"])
    model, _ = load(cfg.model, seed=0)
    precision.apply(model, cfg.precision)
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.up_proj" in names
    assert not any("down_proj" in n or "lm_head" in n for n in names)
    assert len(names) == 2 * 6
    with pytest.raises(ValueError, match=r"precision.include=\['nothing'\] .* selects no nn.Linear"):
        precision.apply(load(cfg.model, seed=0)[0], compose(tiny_overrides + ["precision=fp8_rowwise",
                                                                            "precision.include=[nothing]"]).precision)
    with caplog.at_level(logging.WARNING, logger="lowbit"):         # a typo in a pattern: named, the run goes on
        precision.apply(load(cfg.model, seed=0)[0], compose(tiny_overrides + [
            "precision=fp8_rowwise", "precision.exclude=[*lm_head*,*down_prj*]"]).precision)
    assert "precision.exclude pattern '*down_prj*' matches no module" in caplog.text


def test_quantize_kernels_setting_selects_the_path_and_refuses_unknown_names(tiny_overrides):
    from lowbit import precision
    from lowbit.kernels import quantize
    from lowbit.models.load import load

    cfg = compose(tiny_overrides + ["precision=fp8_rowwise", "precision.quantize_kernels=torch"])
    try:
        precision.apply(load(cfg.model, seed=0)[0], cfg.precision)
        assert quantize.kernels() == "torch"
        cfg.precision.quantize_kernels = "auto"
        for compiled, expected in ((True, "torch"), (False, "triton")):
            precision.apply(load(cfg.model, seed=0)[0], cfg.precision, compiled=compiled)
            assert quantize.kernels() == expected
        for recipe in ("nvfp4", "mxfp4"):      # FP4 blocks: lowbit's kernels in compiled layers too (measured faster)
            cfg.precision.recipe = recipe
            precision.apply(load(cfg.model, seed=0)[0], cfg.precision, compiled=True)
            assert quantize.kernels() == "triton", recipe
        cfg.precision.quantize_kernels = "cutlass"
        with pytest.raises(ValueError, match=r"precision.quantize_kernels='cutlass'.*auto.*triton.*torch"):
            precision.apply(load(cfg.model, seed=0)[0], cfg.precision)
    finally:
        quantize.set_kernels("triton")


@pytest.mark.slow
def test_fp8_rowwise_resume_is_bit_exact(tiny_overrides, tmp_path):
    fp8 = ["precision=fp8_rowwise"]
    whole = [o.replace(str(tmp_path / "run"), str(tmp_path / "whole")) for o in tiny_overrides] + fp8
    run(compose(whole + ["trainer.max_steps=6", "trainer.save_every=3", "trainer.export=false"]))
    split = [o.replace(str(tmp_path / "run"), str(tmp_path / "split")) for o in tiny_overrides] + fp8
    run(compose(split + ["trainer.max_steps=3", "trainer.save_every=3", "trainer.export=false"]))
    run(compose(split + ["trainer.max_steps=6", "trainer.save_every=3", "trainer.resume=auto", "trainer.export=false"]))
    a, b = losses(tmp_path / "whole")[0], losses(tmp_path / "split")[0]
    assert sorted(a) == sorted(b) == list(range(1, 7)) and all(a[s] == b[s] for s in a), (a, b)


CAUSAL = [["precision=fp8_rowwise"], ["precision=fp8_blockwise", "precision.block_size=32"], ["precision=mxfp4"],
          ["precision=fp4_vectorwise", "precision.dge=false", "precision.occ=false"],
          ["precision=fp4_vectorwise", "precision.occ_scope=token"]]
TENSOR_STATISTIC = [["precision=fp8_tensorwise"], ["precision=nvfp4"], ["precision=fp4_vectorwise"]]


@pytest.mark.parametrize("overrides", CAUSAL + TENSOR_STATISTIC, ids=lambda o: "-".join(x.split("=")[1] for x in o))
def test_which_recipes_keep_a_causal_lm_causal(tiny_overrides, overrides):
    """Changing tokens 40.. leaves the logits of tokens 0..39 bit for bit unchanged with scales per token (or per
    token tile) and per weight channel, as in bf16. Recipes with a statistic over the whole activation tensor (the
    tensorwise amax, NVFP4's FP32 tensor scale, OCC's clamp quantile) make every token's output depend a little on
    the other tokens of the batch, later ones included (docs/RESULTS.md, convergence); OCC with
    precision.occ_scope=token clamps each token at its own quantile and is causal."""
    from lowbit import precision
    from lowbit.models.load import load

    cfg = compose(tiny_overrides + overrides)
    model = precision.apply(load(cfg.model, seed=0)[0], cfg.precision)
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 40:] = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before, after = (model(input_ids=t).logits[:, :40].float() for t in (ids, changed))
    if overrides in CAUSAL:
        assert torch.equal(before, after)
    else:
        assert not torch.equal(before, after)

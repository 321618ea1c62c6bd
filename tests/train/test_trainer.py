"""The real pipeline end to end on a tiny Llama and the real Shakespeare data (single process)."""
import json
import math

import pytest
import torch

from lowbit.train.run import run
from lowbit.train.trainer import NonFiniteLossError
from tests.conftest import compose


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def test_trains_logs_checkpoints_and_exports_a_loadable_model(tiny_overrides, tmp_path):
    from transformers import AutoModelForCausalLM

    run(compose(tiny_overrides + ["trainer.max_steps=12", "trainer.save_every=6"]))
    run_dir = tmp_path / "run"
    rows = records(run_dir)
    losses = [r["loss"] for r in rows if "loss" in r]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert len(val) == 2 and val[-1] < val[0]           # step 0 and the end
    for key in ("lr", "grad_norm", "perf/tokens_per_s", "mem/peak_rss_gib", "tokens_seen"):
        assert key in rows[-2] or key in rows[-3], key
    assert (run_dir / "config.yaml").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000006", "step_00000012"]
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    assert exported.config.num_hidden_layers == 2
    ids = torch.randint(0, 1000, (1, 16))
    assert torch.isfinite(exported(input_ids=ids).logits).all()


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tiny_overrides, tmp_path):
    whole = [o.replace(str(tmp_path / "run"), str(tmp_path / "whole")) for o in tiny_overrides]
    run(compose(whole + ["trainer.max_steps=8", "trainer.save_every=4"]))
    split = [o.replace(str(tmp_path / "run"), str(tmp_path / "split")) for o in tiny_overrides]
    run(compose(split + ["trainer.max_steps=8", "trainer.save_every=4", "trainer.stop_after_steps=4"]))
    assert not (tmp_path / "split" / "export").exists()     # an interrupted run exports nothing
    run(compose(split + ["trainer.max_steps=8", "trainer.save_every=4", "trainer.resume=auto"]))
    a, b = train_losses(tmp_path / "whole"), train_losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s] == b[s] for s in a), (a, b)             # exact equality, not a tolerance


def test_refuses_to_overwrite_a_run_and_bad_sizes_before_training(tiny_overrides, tmp_path):
    run(compose(tiny_overrides + ["trainer.max_steps=1", "trainer.export=false"]))
    with pytest.raises(ValueError, match="trainer.resume=auto"):
        run(compose(tiny_overrides + ["trainer.max_steps=2"]))
    other = [o.replace("/run", "/other") for o in tiny_overrides]
    with pytest.raises(ValueError, match="not divisible"):
        run(compose(other + ["trainer.global_batch_size=5"]))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        run(compose(other + ["data.seq_len=4096"]))
    with pytest.raises(FileNotFoundError, match="trainer.resume"):
        run(compose(other + [f"trainer.resume={tmp_path / 'missing'}"]))
    for override, message in (("trainer.max_steps=-5", r"trainer.max_steps=-5 is out of range; use a value >= 0"),
                              ("trainer.eval_batches=-1", r"trainer.eval_batches=-1 .* >= 0 \(0 = the whole"),
                              ("trainer.on_nan=ignore", r"trainer.on_nan='ignore' is not known; use stop or skip"),
                              ("trainer.max_nan_skips=-1", r"trainer.max_nan_skips=-1 is out of range")):
        with pytest.raises(ValueError, match=message):
            run(compose(other + [override]))
    assert not (tmp_path / "other" / "checkpoints").exists()


@pytest.mark.parametrize("max_norm", [0.5, 0.0])
def test_clip_gradients_matches_torch_clip_grad_norm(max_norm):
    """The trainer's clipping (per-parameter norms kept for diagnosis, the global norm from them) against
    torch.nn.utils.clip_grad_norm_ on copies; grad_clip=0 reports the norm and leaves the gradients alone."""
    from types import SimpleNamespace

    from lowbit.train.trainer import Trainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    model(torch.randn(5, 8)).square().sum().backward()
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for r, p in zip(reference, model.parameters()):
        r.grad = p.grad.clone()
    before = torch.stack([r.grad.norm() for r in reference])         # each parameter's norm, before clipping
    expected = torch.nn.utils.clip_grad_norm_(reference, max_norm if max_norm > 0 else float("inf"))
    optimizer = torch.optim.AdamW(model.parameters())
    fake = SimpleNamespace(optimizer=optimizer, params=list(model.parameters()), world=SimpleNamespace(device="cpu"),
                           optim_cfg=SimpleNamespace(grad_clip=max_norm),
                           param_names={id(p): (i, n) for i, (n, p) in enumerate(model.named_parameters())})
    norm, (names, norms) = Trainer.clip_gradients(fake)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6) and norm.item() > 0.5
    assert [name for _, name in names] == [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(norms, before)
    for r, p in zip(reference, model.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=0)


def test_device_side_skip_matches_the_host_checked_step(tiny_overrides, tmp_path):
    """Fused AdamW skips a non-finite step on the device (found_inf) and the trainer reads the verdict a step
    later; the foreach AdamW is checked on the host before its step. Same losses, same skips, same final weights."""
    from safetensors.torch import load_file

    blow_up = ["optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0", "trainer.eval_at_start=false",
               "trainer.eval_every=-1", "trainer.export=false", "trainer.max_steps=3", "trainer.on_nan=skip"]
    runs = {}
    for fused in ("true", "false"):
        overrides = [o.replace("/run", f"/fused_{fused}") for o in tiny_overrides]
        state = run(compose(overrides + blow_up + [f"optim.fused={fused}"]))
        assert state.nan_skips == 2
        run_dir = tmp_path / f"fused_{fused}"
        step = sorted((run_dir / "checkpoints").iterdir())[-1]
        runs[fused] = (train_losses(run_dir), load_file(next(step.glob("model*.safetensors"))))
    (losses_f, weights_f), (losses_h, weights_h) = runs["true"], runs["false"]
    assert losses_f.keys() == losses_h.keys() == {1, 2, 3}
    for step in (1, 2, 3):          # step 0's update overflows the weights: steps 1 and 2 have NaN gradients
        assert losses_f[step] == pytest.approx(losses_h[step], rel=1e-6, nan_ok=True)
    norms = {r["step"]: r["grad_norm"] for r in records(tmp_path / "fused_true") if "grad_norm" in r}
    assert math.isfinite(norms[1]) and not math.isfinite(norms[2]) and not math.isfinite(norms[3])
    for name, value in weights_h.items():          # two skipped steps: both kept step 1's weights
        torch.testing.assert_close(weights_f[name], value, rtol=1e-5, atol=1e-6)


def test_nan_probe_names_where_the_backward_turned_non_finite(tiny_overrides, monkeypatch):
    """LOWBIT_NAN_PROBE=1: an overflowed model whose loss stays finite (the final RMSNorm's square overflows, its
    output is 0) while every gradient is NaN; the probe names the norm's input as the first non-finite gradient."""
    monkeypatch.setenv("LOWBIT_NAN_PROBE", "1")
    blow_up = ["optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0", "trainer.eval_at_start=false",
               "trainer.eval_every=-1", "trainer.export=false", "trainer.max_steps=3", "trainer.save_every=-1"]
    with pytest.raises(NonFiniteLossError, match=r"first non-finite gradient at the input of model\.norm\[0\]; "
                                                 r"largest forward inputs: .*e\+(2|3)\d"):
        run(compose(tiny_overrides + blow_up))


def test_nan_loss_stops_with_the_step_or_is_skipped(tiny_overrides, tmp_path):
    # An absurd learning rate makes step 0's update overflow the weights, so step 1's loss is not finite.
    blow_up = ["optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0", "trainer.eval_at_start=false",
               "trainer.eval_every=-1", "trainer.export=false"]
    with pytest.raises(NonFiniteLossError, match=r"at step 1: .*non-finite gradients in \d+ parameters: model\."):
        run(compose(tiny_overrides + blow_up + ["trainer.max_steps=3", "trainer.save_every=-1"]))
    assert not (tmp_path / "run" / "checkpoints").exists()
    skip = [o.replace("/run", "/skip") for o in tiny_overrides]
    state = run(compose(skip + blow_up + ["trainer.max_steps=3", "trainer.on_nan=skip", "trainer.save_every=-1"]))
    assert state.step == 3 and state.nan_skips == 2
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        run(compose([o.replace("/run", "/few") for o in tiny_overrides] + blow_up +
                    ["trainer.max_steps=3", "trainer.on_nan=skip", "trainer.max_nan_skips=1", "trainer.save_every=-1"]))

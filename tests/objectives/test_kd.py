"""KD losses against float64 references, CAKLD's limits, the bitdistill objective's setup and bad inputs."""
import pytest
import torch
from omegaconf import OmegaConf

from lowbit.config import ObjectiveConfig
from lowbit.objectives import build
from lowbit.objectives.kd import KD_LOSSES, BitDistill, cakld, forward_kl, next_token_confidence, reverse_kl, topk_kl
from lowbit.quant.linear import FakeQuantLinear
from tests.conftest import compose
from tests.quant.tiny import tiny_llama


def logits_pair(seed=0, n=37, vocab=101):
    torch.manual_seed(seed)
    return torch.randn(n, vocab) * 3, torch.randn(n, vocab) * 3


def kl64(p_logits, q_logits):
    """float64 mean_n sum_v p (log p - log q) from softmax written out."""
    p_logits, q_logits = p_logits.double(), q_logits.double()
    p = torch.exp(p_logits - p_logits.max(-1, keepdim=True).values)
    p = p / p.sum(-1, keepdim=True)
    q = torch.exp(q_logits - q_logits.max(-1, keepdim=True).values)
    q = q / q.sum(-1, keepdim=True)
    return (p * (p.log() - q.log())).sum(-1).mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl_equal_float64_reference(temperature):
    s, t = logits_pair()
    torch.testing.assert_close(forward_kl(s, t, temperature).double(),
                               kl64(t / temperature, s / temperature) * temperature ** 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reverse_kl(s, t, temperature).double(),
                               kl64(s / temperature, t / temperature) * temperature ** 2, rtol=1e-5, atol=1e-6)
    assert forward_kl(t, t).abs() < 1e-6 and reverse_kl(s, s).abs() < 1e-6


def test_cakld_reduces_exactly_to_forward_and_reverse_kl_and_mixes_linearly():
    s, t = logits_pair(1)
    assert torch.equal(cakld(s, t, 0.0), forward_kl(s, t))
    assert torch.equal(cakld(s, t, 1.0), reverse_kl(s, t))
    torch.testing.assert_close(cakld(s, t, 0.3).double(), 0.3 * kl64(s, t) + 0.7 * kl64(t, s), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        cakld(s, t, 1.5)


def test_topk_kl_equals_float64_binned_reference_and_is_bounded_by_forward_kl():
    s, t = logits_pair(2)
    k = 5
    top = t.topk(k, -1).indices

    def bins64(logits):
        p = torch.softmax(logits.double(), -1)
        head = p.gather(-1, top)
        return torch.cat([head, 1 - head.sum(-1, keepdim=True)], -1)

    q_t, q_s = bins64(t), bins64(s)
    ref = (q_t * (q_t.log() - q_s.log())).sum(-1).mean()
    torch.testing.assert_close(topk_kl(s, t, k).double(), ref, rtol=1e-5, atol=1e-6)
    assert topk_kl(s, t, k) <= forward_kl(s, t) + 1e-6          # coarser partition: data-processing inequality
    with pytest.raises(ValueError, match="topk"):
        topk_kl(s, t, 0)


def test_kl_gradients_match_float64_autograd():
    s, t = logits_pair(3, n=5, vocab=17)
    s32 = s.clone().requires_grad_()
    forward_kl(s32, t).backward()
    s64 = s.double().requires_grad_()
    kl64(t, s64).backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)


def test_confidence_is_the_teachers_mean_next_token_probability():
    torch.manual_seed(4)
    logits, ids = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 6))
    total, count = next_token_confidence(logits, ids)
    p = torch.softmax(logits.double(), -1)
    ref = torch.stack([p[b, i, ids[b, i + 1]] for b in range(2) for i in range(5)]).sum()
    assert count == 10
    torch.testing.assert_close(total.double(), ref, rtol=1e-6, atol=1e-7)


def objective_cfg(**kd):
    cfg = OmegaConf.structured(ObjectiveConfig(name="bitdistill"))
    cfg.qat.group_size, cfg.qat.partial_groups, cfg.qat.format = 32, True, "int2"
    losses = kd.pop("losses", None)
    if losses is not None:
        for name in KD_LOSSES:
            setattr(cfg.kd.losses, name, losses.get(name, 0.0))
    for key, value in kd.items():
        setattr(cfg.kd, key, value)
    return cfg


def test_objective_fake_quantizes_the_student_and_freezes_a_bf16_teacher_copy():
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    objective = build(objective_cfg(), model)
    assert isinstance(objective, BitDistill)
    quantized = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    assert len(quantized) == 14 and not any("lm_head" in n for n in quantized)
    teacher = objective.teacher
    assert not any(isinstance(m, FakeQuantLinear) for m in teacher.modules())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, original[key].to(torch.bfloat16)), key
    ids = torch.randint(0, 256, (2, 16))
    loss, metrics = objective.loss(model, ids)
    assert loss.requires_grad and metrics["kd/cakld"] > 0 and 0 < metrics["kd/confidence"] < 1
    loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert all(bool(m.calibrated) for m in model.modules() if isinstance(m, FakeQuantLinear))


def test_combined_losses_are_the_weighted_sum():
    model = tiny_llama()
    objective = build(objective_cfg(losses={"ce": 0.5, "forward_kl": 1.0, "topk_kl": 2.0}), model)
    loss, metrics = objective.loss(model, torch.randint(0, 256, (2, 16)))
    expected = 0.5 * metrics["kd/ce"] + metrics["kd/forward_kl"] + 2.0 * metrics["kd/topk_kl"]
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    ce_only = build(objective_cfg(losses={"ce": 1.0}), tiny_llama())
    assert ce_only.teacher is None                                # QAT without KD holds no teacher


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="teacher's vocabulary \\(300 tokens\\) does not match the student's \\(256\\)"):
        BitDistill(objective_cfg(), tiny_llama(), teacher=tiny_llama(vocab_size=300))
    with pytest.raises(ValueError, match="gives no loss a non-zero weight"):
        build(objective_cfg(losses={}), tiny_llama())
    with pytest.raises(Exception, match="kl"):                  # an unknown loss name fails at composition
        compose(["objective=bitdistill", "objective.kd.losses.kl=1.0"])
    cfg = objective_cfg()
    cfg.qat.format = "int8"
    with pytest.raises(ValueError, match="objective.qat.format='int8' is not supported"):
        build(cfg, tiny_llama())
    cfg = objective_cfg()
    cfg.qat.partial_groups, cfg.qat.group_size = False, 64
    with pytest.raises(ValueError, match="does not divide the layer's input dimension 96"):
        build(cfg, tiny_llama())


def test_exp_preset_composes_the_quality_bar_run():
    cfg = compose(["+exp=bitdistill"])
    assert cfg.model.name == "smollm2_135m" and cfg.objective.name == "bitdistill"
    assert (cfg.objective.qat.format, cfg.objective.qat.group_size, cfg.objective.qat.partial_groups) == ("int3", 128, True)
    assert cfg.objective.kd.losses.cakld == 1.0 and cfg.objective.kd.losses.ce == 0.0
    assert cfg.data.sources == ["../shared/data/gutenberg/train.jsonl.gz"]
    assert cfg.trainer.max_steps * cfg.trainer.global_batch_size * cfg.data.seq_len >= 20_000_000
    ce_only = compose(["+exp=bitdistill", "objective.kd.losses.cakld=0", "objective.kd.losses.ce=1"])
    assert dict(ce_only.objective.kd.losses) == {"ce": 1.0, "forward_kl": 0.0, "reverse_kl": 0.0, "cakld": 0.0,
                                                 "topk_kl": 0.0}


@pytest.mark.parametrize("cfg, named", [(dict(tp=2), "parallel.tp"), (dict(dp_shard=2), "parallel.dp_shard"),
                                        (dict(data_parallel="deepspeed", zero_stage=3), "parallel.zero_stage=3")])
def test_layouts_that_shard_weights_or_logits_are_refused_with_the_fix(cfg, named):
    from lowbit.config import ParallelConfig
    from lowbit.objectives.kd import BitDistill

    objective = object.__new__(BitDistill)          # the check reads the layout only
    with pytest.raises(ValueError, match=f"does not support {named}.*parallel=ddp"):
        objective.check_parallel(ParallelConfig(**cfg))
    objective.check_parallel(ParallelConfig(ulysses=2))
    objective.check_parallel(ParallelConfig(data_parallel="deepspeed", zero_stage=2))

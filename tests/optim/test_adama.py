"""AdamA (arXiv 2305.19982) against torch.optim.AdamW (one micro-batch) and a float64 reference (N micro-batches)."""
import math

import pytest
import torch
from torch import nn

from lowbit.config import OptimConfig
from lowbit.optim import build
from lowbit.optim.adama import AdamA

BETAS, EPS, LR, WD = (0.9, 0.95), 1e-8, 1e-2, 0.1


def small_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def groups(model):
    return [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": WD},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]


def batches(steps, micro_batches, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [[(torch.randn(3, 7, generator=generator), torch.randn(3, 3, generator=generator))
             for _ in range(micro_batches)] for _ in range(steps)]


def micro_loss(model, x, y, micro_batches):
    return ((model(x.to(next(model.parameters()).dtype)) - y) ** 2).mean() / micro_batches


def reference_adama_float64(model, data, lr_at, clip=0.0, second_moment="paper"):
    """The paper's Algorithm 1 in float64, written out plainly: m, v accumulate per micro-batch gradient.
    second_moment="cross_corrected": after the N folds, v also gets (1 - beta2)(1 - 1/N) m_hat^2."""
    params = [p.detach().double().clone().requires_grad_(True) for p in model.parameters()]
    decays = [WD if p.ndim >= 2 else 0.0 for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    shadow = small_model().double()
    for t, step_batches in enumerate(data, start=1):
        m = [BETAS[0] * x for x in m]
        v = [BETAS[1] * x for x in v]
        for x, y in step_batches:
            for target, source in zip(shadow.parameters(), params):
                target.data.copy_(source.data)
            shadow.zero_grad()
            ((shadow(x.double()) - y.double()) ** 2).mean().div(len(step_batches)).backward()
            for index, p in enumerate(shadow.parameters()):
                g = p.grad
                if clip > 0:
                    g = g * min(1.0, clip / (g.norm().item() + 1e-6))
                m[index] = m[index] + (1 - BETAS[0]) * g
                v[index] = v[index] + (1 - BETAS[1]) * g * g
        n = len(step_batches)
        if second_moment == "cross_corrected" and n > 1:
            v = [v[i] + (1 - BETAS[1]) * (1 - 1 / n) * (m[i] / (1 - BETAS[0] ** t)) ** 2 for i in range(len(v))]
        lr = lr_at(t - 1)
        with torch.no_grad():
            for index, p in enumerate(params):
                m_hat = m[index] / (1 - BETAS[0] ** t)
                v_hat = v[index] / (1 - BETAS[1] ** t)
                p.mul_(1 - lr * decays[index])
                p.sub_(lr * m_hat / (v_hat.sqrt() + EPS))
    return params


def run_adama(model, optimizer, data, lr_at):
    for step, step_batches in enumerate(data):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        for x, y in step_batches:
            micro_loss(model, x, y, len(step_batches)).backward()
            assert all(p.grad is None for p in model.parameters()), "AdamA must free every gradient in its hook"
        optimizer.step()
        optimizer.zero_grad()


def cosine(step):
    return LR * (0.5 + 0.5 * math.cos(math.pi * step / 20))


@pytest.mark.parametrize("second_moment", ["paper", "cross_corrected"])
def test_one_micro_batch_equals_torch_adamw_over_20_steps(second_moment):
    """One micro-batch: no sum of squares to differ and no cross terms to add -- AdamW, either way."""
    a, b = small_model(), small_model()
    adama = AdamA(groups(a), lr=LR, betas=BETAS, eps=EPS, second_moment=second_moment)
    adamw = torch.optim.AdamW(groups(b), lr=LR, betas=BETAS, eps=EPS)
    data = batches(20, 1)
    run_adama(a, adama, data, cosine)
    for step, ((x, y),) in enumerate(data):
        for group in adamw.param_groups:
            group["lr"] = cosine(step)
        micro_loss(b, x, y, 1).backward()
        adamw.step()
        adamw.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("micro_batches,clip", [(4, 0.0), (3, 0.05)])
def test_n_micro_batches_equal_a_float64_reference_of_the_paper(micro_batches, clip):
    model = small_model()
    expected = reference_adama_float64(model, batches(20, micro_batches), cosine, clip=clip)
    optimizer = AdamA(groups(model), lr=LR, betas=BETAS, eps=EPS, clip_per_tensor=clip)
    run_adama(model, optimizer, batches(20, micro_batches), cosine)
    for p, q in zip(model.parameters(), expected):
        torch.testing.assert_close(p.double(), q.detach(), atol=1e-6, rtol=0)
    # and it is not plain Adam: sum of squares differs from the square of the sum
    adamw_model = small_model()
    adamw = torch.optim.AdamW(groups(adamw_model), lr=LR, betas=BETAS, eps=EPS)
    for step, step_batches in enumerate(batches(20, micro_batches)):
        for group in adamw.param_groups:
            group["lr"] = cosine(step)
        for x, y in step_batches:
            micro_loss(adamw_model, x, y, micro_batches).backward()
        adamw.step()
        adamw.zero_grad()
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), adamw_model.parameters())) > 1e-4


def test_cross_corrected_second_moment_equals_its_float64_reference():
    """optim.second_moment=cross_corrected: the paper's folds, plus the expected cross terms once per step."""
    model = small_model()
    expected = reference_adama_float64(model, batches(20, 4), cosine, second_moment="cross_corrected")
    optimizer = AdamA(groups(model), lr=LR, betas=BETAS, eps=EPS, second_moment="cross_corrected")
    run_adama(model, optimizer, batches(20, 4), cosine)
    for p, q in zip(model.parameters(), expected):
        torch.testing.assert_close(p.double(), q.detach(), atol=1e-6, rtol=0)
    paper = reference_adama_float64(small_model(), batches(20, 4), cosine)
    assert max((p.double() - q.detach()).abs().max().item() for p, q in zip(model.parameters(), paper)) > 1e-4



def reference_summed_float64(model, data, lr_at, clip=0.0, clip_global=0.0):
    """second_moment=summed written out: AdamW's moments of the step's summed gradient in float64, with the two
    roundings the packed state makes -- the sum kept in bfloat16 after each fold, v rounded to bfloat16 once per
    step. Gradients from a float32 copy of the model (the optimizer's arithmetic is what is under test)."""
    params = [p.detach().double().clone() for p in model.parameters()]
    decays = [WD if p.ndim >= 2 else 0.0 for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    shadow = small_model()
    for t, step_batches in enumerate(data, start=1):
        sums = [None] * len(params)
        for x, y in step_batches:
            for target, source in zip(shadow.parameters(), params):
                target.data.copy_(source.float())
            shadow.zero_grad()
            micro_loss(shadow, x, y, len(step_batches)).backward()
            for index, p in enumerate(shadow.parameters()):
                g = p.grad
                if clip > 0:    # in float32, as the optimizer scales: a bfloat16 sum rounds an ulp apart otherwise
                    g = g * (clip / (torch.linalg.vector_norm(g) + 1e-6)).clamp(max=1.0)
                sums[index] = (g if sums[index] is None else sums[index].float() + g).bfloat16()
        lr = lr_at(t - 1)
        norm = math.sqrt(sum(t.double().square().sum().item() for t in sums))
        coefficient = min(1.0, clip_global / (norm + 1e-6)) if clip_global > 0 else 1.0
        for index, p in enumerate(params):
            total = sums[index].double() * coefficient
            m[index] = BETAS[0] * m[index] + (1 - BETAS[0]) * total
            v[index] = BETAS[1] * v[index].float().bfloat16().double() + (1 - BETAS[1]) * total * total
            m_hat = m[index] / (1 - BETAS[0] ** t)
            v_hat = v[index] / (1 - BETAS[1] ** t)
            p.mul_(1 - lr * decays[index])
            p.sub_(lr * m_hat / (v_hat.sqrt() + EPS))
    return params


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_summed_second_moment_equals_its_float64_reference(clip):
    """optim.second_moment=summed: AdamW's moments of the summed gradient, carried in v's words as two bfloat16 halves."""
    model = small_model()
    expected = reference_summed_float64(model, batches(20, 4), cosine, clip=clip)
    optimizer = AdamA(groups(model), lr=LR, betas=BETAS, eps=EPS, clip_per_tensor=clip, second_moment="summed")
    run_adama(model, optimizer, batches(20, 4), cosine)
    # 1e-6 but where a float32 gradient of the float32 parameters and the reference's float64 ones round to
    # bfloat16 sums one ulp (2^-9) apart: one bias entry of the clipped run, 6.3e-6 after 20 steps
    for p, q in zip(model.parameters(), expected):
        torch.testing.assert_close(p.double(), q, atol=1e-5, rtol=0)


def test_summed_second_moment_with_global_clipping_equals_its_float64_reference():
    """optim.grad_clip_mode=global under summed: the global norm of the step's summed gradient, clipped as AdamW's
    clip_grad_norm_ clips it (active: the norms here are ~0.1-1)."""
    model = small_model()
    expected = reference_summed_float64(model, batches(20, 4), cosine, clip_global=0.05)
    optimizer = AdamA(groups(model), lr=LR, betas=BETAS, eps=EPS, second_moment="summed", clip_global=0.05)
    unclipped = reference_summed_float64(small_model(), batches(20, 4), cosine)
    for step, step_batches in enumerate(batches(20, 4)):
        for group in optimizer.param_groups:
            group["lr"] = cosine(step)
        for x, y in step_batches:
            micro_loss(model, x, y, 4).backward()
        norm = optimizer.micro_batch_grad_norm()
        assert norm > 0.05 and math.isfinite(norm)
        optimizer.step()
    for p, q in zip(model.parameters(), expected):
        torch.testing.assert_close(p.double(), q, atol=1e-5, rtol=0)
    assert max((p.double() - q).abs().max().item() for p, q in zip(model.parameters(), unclipped)) > 1e-3
    with pytest.raises(ValueError, match="clip_global=0.05 needs second_moment='summed'"):
        AdamA(groups(small_model()), second_moment="paper", clip_global=0.05)



def test_summed_step_with_a_non_finite_gradient_can_be_discarded():
    """Under summed a NaN reaches only the step's sum: discard_step restores v (bfloat16-rounded) and m is untouched,
    and the next step runs as if the bad one never happened. The paper's folds cannot be undone."""
    model = small_model()
    optimizer = AdamA(groups(model), lr=LR, betas=BETAS, eps=EPS, second_moment="summed")
    run_adama(model, optimizer, batches(3, 4), cosine)
    before = [(s["exp_avg"].clone(), s["exp_avg_sq"].clone()) for s in optimizer.state.values()]
    weights = [p.detach().clone() for p in model.parameters()]
    for x, y in batches(1, 4, seed=9)[0]:
        (micro_loss(model, x, y, 4) * float("nan")).backward()
    assert not math.isfinite(optimizer.micro_batch_grad_norm())
    assert optimizer.can_discard_step
    optimizer.discard_step()
    for (m, v), state in zip(before, optimizer.state.values()):
        assert state["folded"] == 0
        torch.testing.assert_close(state["exp_avg"], m, atol=0, rtol=0)
        torch.testing.assert_close(state["exp_avg_sq"], v.bfloat16().float(), atol=0, rtol=0)
    assert optimizer.micro_batch_grad_norm() == 0.0
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    run_adama(model, optimizer, batches(1, 4, seed=10), cosine)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    paper = AdamA(groups(small_model()), second_moment="paper")
    assert not paper.can_discard_step
    with pytest.raises(RuntimeError, match="second_moment=summed"):
        paper.discard_step()

def test_summed_second_moment_is_adamw_where_micro_batches_agree():
    """Four identical micro-batches: AdamW's v sees (4 g)^2, the paper's sum of squares 4 g^2 -- so the paper's steps
    are twice as large -- and summed sees (4 g)^2 up to its bfloat16 roundings."""
    def identical(steps):
        return [[step[0]] * 4 for step in batches(steps, 1)]
    adamw_model = small_model()
    adamw = torch.optim.AdamW(groups(adamw_model), lr=LR, betas=BETAS, eps=EPS)
    for step, step_batches in enumerate(identical(20)):
        for group in adamw.param_groups:
            group["lr"] = cosine(step)
        for x, y in step_batches:
            micro_loss(adamw_model, x, y, 4).backward()
        adamw.step()
        adamw.zero_grad()
    gaps = {}
    for second_moment in ("paper", "summed"):
        model = small_model()
        optimizer = AdamA(groups(model), lr=LR, betas=BETAS, eps=EPS, second_moment=second_moment)
        run_adama(model, optimizer, identical(20), cosine)
        gaps[second_moment] = max((p - q).abs().max().item() for p, q in zip(model.parameters(),
                                                                              adamw_model.parameters()))
    assert gaps["summed"] < 1e-3 < gaps["paper"], gaps


def test_summed_state_taken_mid_step_is_the_state_before_the_step():
    model = small_model()
    optimizer = AdamA(groups(model), lr=LR, betas=BETAS, eps=EPS, second_moment="summed")
    run_adama(model, optimizer, batches(3, 4), cosine)
    before = {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in s.items()}
              for k, s in optimizer.state_dict()["state"].items()}
    for x, y in batches(1, 4, seed=5)[0][:2]:          # two of four micro-batches folded
        micro_loss(model, x, y, 4).backward()
    mid = optimizer.state_dict()["state"]
    for index, saved in mid.items():
        assert saved["folded"] == 0
        torch.testing.assert_close(saved["exp_avg"], before[index]["exp_avg"], atol=0, rtol=0)
        torch.testing.assert_close(saved["exp_avg_sq"], before[index]["exp_avg_sq"].bfloat16().float(), atol=0, rtol=0)
    live = next(iter(optimizer.state.values()))
    assert live["folded"] == 2                         # the live state goes on with the step
    fresh = AdamA(groups(small_model()), lr=LR, betas=BETAS, eps=EPS, second_moment="summed")
    fresh.load_state_dict(optimizer.state_dict())      # and the snapshot loads as a clean state

def test_second_moment_option_is_checked():
    with pytest.raises(ValueError, match="second_moment='exact'"):
        AdamA(groups(small_model()), second_moment="exact")
    with pytest.raises(ValueError, match="optim=adama only"):
        build(OptimConfig(name="adamw", second_moment="cross_corrected"), list(small_model().parameters()))
    with pytest.raises(ValueError, match="optim.second_moment='exact' is not known"):
        build(OptimConfig(name="adama", grad_clip_mode="per_tensor", second_moment="exact"), list(small_model().parameters()))
    optimizer = build(OptimConfig(name="adama", grad_clip_mode="per_tensor", second_moment="cross_corrected"),
                      list(small_model().parameters()))
    assert isinstance(optimizer, AdamA) and optimizer.second_moment == "cross_corrected"


@pytest.mark.parametrize("key,value", [("lr", -1.0), ("lr", float("nan")), ("weight_decay", -0.1), ("eps", 0.0),
                                       ("min_lr_ratio", 1.5), ("warmup_steps", -1), ("grad_clip", -1.0),
                                       ("betas", [0.9, 1.0]), ("betas", [0.9])])
@pytest.mark.parametrize("name", ["adamw", "adama"])
def test_out_of_range_numbers_name_their_key(name, key, value):
    cfg = OptimConfig(name=name, grad_clip_mode="per_tensor" if name == "adama" else "global", **{key: value})
    with pytest.raises(ValueError, match=rf"optim\.{key}="):
        build(cfg, list(small_model().parameters()))


def test_state_dict_resume_is_bit_exact_and_keeps_float32_moments():
    data = batches(6, 2)
    whole = small_model()
    optimizer = AdamA(groups(whole), lr=LR, betas=BETAS, eps=EPS)
    run_adama(whole, optimizer, data, cosine)

    first = small_model()
    optimizer = AdamA(groups(first), lr=LR, betas=BETAS, eps=EPS)
    run_adama(first, optimizer, data[:3], cosine)
    saved_model, saved_optimizer = first.state_dict(), optimizer.state_dict()
    second = small_model()
    second.load_state_dict(saved_model)
    resumed = AdamA(groups(second), lr=LR, betas=BETAS, eps=EPS)
    resumed.load_state_dict(saved_optimizer)
    run_adama(second, resumed, data[3:], lambda step: cosine(step + 3))
    for p, q in zip(whole.parameters(), second.parameters()):
        assert torch.equal(p, q)

    bf16 = small_model(torch.bfloat16)
    optimizer = AdamA(groups(bf16), lr=LR, betas=BETAS, eps=EPS)
    run_adama(bf16, optimizer, data[:2], cosine)
    again = AdamA(groups(bf16), lr=LR, betas=BETAS, eps=EPS)
    again.load_state_dict(optimizer.state_dict())
    for p in bf16.parameters():
        assert again.state[p]["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(again.state[p]["exp_avg_sq"], optimizer.state[p]["exp_avg_sq"])


def test_bfloat16_parameters_follow_the_float64_reference_to_bf16_rounding():
    model = small_model(torch.bfloat16)
    start = small_model(torch.bfloat16).float()
    expected = reference_adama_float64(start, batches(5, 2), lambda s: 1e-3)
    optimizer = AdamA(groups(model), lr=1e-3, betas=BETAS, eps=EPS)
    run_adama(model, optimizer, batches(5, 2), lambda s: 1e-3)
    for p, q in zip(model.parameters(), expected):
        torch.testing.assert_close(p.double(), q.detach(), atol=2e-2, rtol=2e-2)


def test_build_registers_adama_and_refuses_global_norm_clipping():
    model = small_model()
    cfg = OptimConfig(name="adama", grad_clip=1.0, grad_clip_mode="per_tensor")
    assert isinstance(build(cfg, list(model.parameters())), AdamA)
    with pytest.raises(ValueError, match="grad_clip_mode=per_tensor"):
        build(OptimConfig(name="adama", grad_clip=1.0, grad_clip_mode="global"), list(model.parameters()))
    summed = build(OptimConfig(name="adama", grad_clip=1.0, grad_clip_mode="global", second_moment="summed"),
                   list(small_model().parameters()))
    assert (summed.clip_global, summed.clip_per_tensor) == (1.0, 0.0)
    assert isinstance(build(OptimConfig(name="adama", grad_clip=0.0), list(small_model().parameters())), AdamA)
    with pytest.raises(ValueError, match="adamw or adama"):
        build(OptimConfig(name="sgd"), list(small_model().parameters()))


def test_dropping_the_optimizer_frees_its_moments():
    """Hooks live on the parameters (C++), so they must not keep the optimizer (and its moments) alive."""
    import gc
    import weakref

    model = small_model()
    optimizer = AdamA(groups(model), lr=LR)
    run_adama(model, optimizer, batches(1, 2), cosine)
    alive = weakref.ref(optimizer)
    del optimizer
    gc.collect()
    assert alive() is None
    micro_loss(model, *batches(1, 1)[0][0], 1).backward()     # the orphaned hooks leave gradients alone
    assert all(p.grad is not None for p in model.parameters())

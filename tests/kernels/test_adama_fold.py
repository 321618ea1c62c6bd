"""AdamA's one-kernel fold and update (lowbit/kernels/adama_fold_triton.py) equal the PyTorch paths of AdamA._fold
and AdamA.step and a float64 evaluation of the same formulas (TRITON_INTERPRET=1 on CPU, in a subprocess so the
interpreter setting cannot leak into other tests)."""
import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def torch_path(grad, m, v, clip, beta1, beta2, first):
    """AdamA._fold's PyTorch branch, on copies."""
    from lowbit.optim.adama import AdamA
    param = torch.nn.Parameter(torch.zeros_like(grad, dtype=torch.float32))
    optimizer = AdamA([param], betas=(beta1, beta2), clip_per_tensor=clip, fused=False)
    state = optimizer._state_of(param)
    state["exp_avg"].copy_(m)
    state["exp_avg_sq"].copy_(v)
    state["folded"] = 0 if first else 1
    optimizer._fold(param, grad.clone())
    optimizer.remove_hooks()
    return state["exp_avg"], state["exp_avg_sq"]


def float64_path(grad, m, v, clip, beta1, beta2, first):
    g, m, v = grad.double(), m.double(), v.double()
    if clip > 0:
        g = g * min(clip / (g.norm().item() + 1e-6), 1.0)
    if first:
        m, v = m * beta1, v * beta2
    return m + (1 - beta1) * g, v + (1 - beta2) * g * g


def check_kernel() -> None:
    from lowbit.kernels import adama_fold_triton
    generator = torch.Generator().manual_seed(0)
    cases = 0
    for n in (1, 7, 2048, 5000):
        for dtype in (torch.float32, torch.bfloat16):
            for clip in (0.0, 0.5, 1e6):           # off, active (norms are ~sqrt(n)), inactive
                for first in (True, False):
                    grad = torch.randn(n, generator=generator).to(dtype)
                    m = torch.randn(n, generator=generator) * 0.1
                    v = torch.rand(n, generator=generator) * 0.01
                    want_m, want_v = torch_path(grad, m, v, clip, 0.9, 0.95, first)
                    m64, v64 = float64_path(grad, m, v, clip, 0.9, 0.95, first)
                    got_m, got_v = m.clone(), v.clone()
                    norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
                    sq_norm = torch.full((), 0.25)
                    adama_fold_triton.fold(grad, got_m, got_v, norm, sq_norm, clip, 0.9, 0.95, first)
                    assert sq_norm.item() == (torch.full((), 0.25) + norm.square()).item()
                    # float32, within an ulp of the operands (|m| < 0.5, v < 0.05): where m * beta1 and the
                    # increment nearly cancel, fused multiply-add and two roundings differ by that much
                    torch.testing.assert_close(got_m, want_m, rtol=2e-7, atol=6e-8)
                    torch.testing.assert_close(got_v, want_v, rtol=2e-7, atol=4e-9)
                    torch.testing.assert_close(got_m.double(), m64, rtol=1e-6, atol=6e-8)
                    torch.testing.assert_close(got_v.double(), v64, rtol=1e-6, atol=4e-9)
                    cases += 1
    try:
        adama_fold_triton.fold(torch.zeros(4, 4).t(), torch.zeros(4, 4), torch.zeros(4, 4), torch.ones(()),
                               torch.zeros(()), 0.0, 0.9, 0.95, True)
    except ValueError as error:
        assert "optim.fused=false" in str(error)
    else:
        raise AssertionError("a transposed gradient must be refused")
    print(f"adama fold kernel == torch path: {cases} cases")


def check_update() -> None:
    """The one-kernel update equals AdamA.step's foreach path (fused=False) and float64, after 3 folded steps."""
    from lowbit.kernels import adama_fold_triton
    from lowbit.optim.adama import AdamA
    generator = torch.Generator().manual_seed(1)
    cases = 0
    for n in (1, 7, 2048, 5000):
        for dtype in (torch.float32, torch.bfloat16):
            for second_moment in ("paper", "cross_corrected"):
                for weight_decay in (0.0, 0.1):
                    p0 = torch.randn(n, generator=generator).to(dtype)
                    m = torch.randn(n, generator=generator) * 0.1
                    v = torch.rand(n, generator=generator) * 0.01
                    param = torch.nn.Parameter(p0.clone())
                    optimizer = AdamA([param], lr=1e-2, betas=(0.9, 0.95), weight_decay=weight_decay,
                                      fused=False, second_moment=second_moment)
                    state = optimizer._state_of(param)
                    state["exp_avg"].copy_(m)
                    state["exp_avg_sq"].copy_(v)
                    state["step"].fill_(2)
                    state["folded"] = 4
                    optimizer.step()
                    optimizer.remove_hooks()
                    bias1, bias2_sqrt = 1 - 0.9 ** 3, math.sqrt(1 - 0.95 ** 3)
                    cross = (1 - 0.95) * (1 - 1 / 4) / bias1 ** 2 if second_moment == "cross_corrected" else 0.0
                    got_p, got_v = p0.clone(), v.clone()
                    adama_fold_triton.update(got_p, m, got_v, lr=1e-2, weight_decay=weight_decay, eps=1e-8,
                                             bias1=bias1, bias2_sqrt=bias2_sqrt, cross=cross)
                    v64 = v.double() + cross * m.double() ** 2
                    want64 = p0.double() * (1 - 1e-2 * weight_decay) - 1e-2 / bias1 * m.double() / (
                        v64.sqrt() / bias2_sqrt + 1e-8)
                    # float32: within an ulp of the parameter (fused multiply-add vs two roundings); bf16: the
                    # same float32 value rounded once, so equal or one bf16 ulp apart where it lands on a tie
                    tol = dict(rtol=2e-7, atol=2e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
                    torch.testing.assert_close(got_v, state["exp_avg_sq"], rtol=2e-7, atol=1e-9)
                    torch.testing.assert_close(got_p, param.detach(), **tol)
                    torch.testing.assert_close(got_p.double(), want64, rtol=1e-6 if dtype == torch.float32 else 8e-3,
                                               atol=1e-6)
                    cases += 1
    print(f"adama update kernel == torch path: {cases} cases")



def check_summed() -> None:
    """second_moment=summed: three folds (the step's bfloat16 sum in the low halves of v's words, v rounded into the
    high halves) equal the PyTorch path word for word, and the update equals AdamA.step's PyTorch path."""
    from lowbit.kernels import adama_fold_triton
    from lowbit.optim.adama import AdamA
    generator = torch.Generator().manual_seed(2)
    cases = 0
    for n in (1, 7, 2048, 5000):
        for dtype in (torch.float32, torch.bfloat16):
            for clip in (0.0, 0.5):
                p0 = torch.randn(n, generator=generator).to(dtype)
                m = torch.randn(n, generator=generator) * 0.1
                v = torch.rand(n, generator=generator) * 0.01
                grads = [torch.randn(n, generator=generator).to(dtype) for _ in range(3)]
                param = torch.nn.Parameter(p0.clone())
                optimizer = AdamA([param], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, clip_per_tensor=clip,
                                  fused=False, second_moment="summed", clip_global=0.3 if clip else 0.0)
                state = optimizer._state_of(param)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                state["step"].fill_(2)
                got_m, got_v, got_p = m.clone(), v.clone(), p0.clone()
                for index, grad in enumerate(grads):
                    optimizer._fold(param, grad.clone())
                    norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
                    adama_fold_triton.fold_summed(grad, got_v, norm, torch.zeros(()), clip, index == 0)
                    assert torch.equal(got_v.view(torch.int32), state["exp_avg_sq"].view(torch.int32)), (n, dtype, index)
                assert torch.equal(got_m, state["exp_avg"])      # m waits for the update
                # with clip: global-norm clipping too (the coefficient the optimizer computes, given to the kernel)
                scale = (0.3 / (optimizer._summed_norm() + 1e-6)).clamp(max=1.0) if clip else None
                optimizer.step()
                optimizer.remove_hooks()
                adama_fold_triton.update_summed(got_p, got_m, got_v, beta1=0.9, beta2=0.95, lr=1e-2, weight_decay=0.1,
                                                eps=1e-8, bias1=1 - 0.9 ** 3, bias2_sqrt=math.sqrt(1 - 0.95 ** 3),
                                                scale=scale)
                torch.testing.assert_close(got_m, state["exp_avg"], rtol=2e-7, atol=6e-8)
                torch.testing.assert_close(got_v, state["exp_avg_sq"], rtol=2e-7, atol=1e-9)
                tol = dict(rtol=2e-7, atol=2e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
                torch.testing.assert_close(got_p, param.detach(), **tol)
                cases += 1
    print(f"adama summed kernels == torch path: {cases} cases")

def test_fused_fold_kernel_equals_the_pytorch_path_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    code = ("from tests.kernels.test_adama_fold import check_kernel, check_summed, check_update; check_kernel(); "
            "check_update(); check_summed()")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "48 cases" in result.stdout and "update kernel == torch path: 32 cases" in result.stdout
    assert "summed kernels == torch path: 16 cases" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_adama_equals_the_pytorch_path_on_gpu():
    """Compiled fold and update kernels vs AdamA(fused=False): 5 steps x 3 micro-batches of a small MLP, each second
    moment, float32 and bf16 parameters. Each step starts the PyTorch side from the fused side's parameters and
    state: summed rounds the step's sum to bfloat16, so one float32 ulp of difference (FMA contraction in the
    update) flips a rounding now and then and, left to compound, grows (measured on an H200: 2 words differ at step
    2, 3,808 at step 5, parameters 4.9e-5 apart). From equal inputs the summed folds must agree word for word."""
    from lowbit.optim.adama import AdamA
    for second_moment in ("paper", "cross_corrected", "summed"):
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            base = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 8))
            base = base.cuda().to(dtype)
            models = [base, copy.deepcopy(base)]
            optimizers = [AdamA(m.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, clip_per_tensor=1.0,
                                fused=fused, second_moment=second_moment) for m, fused in zip(models, (True, False))]
            pairs = list(zip(*(m.parameters() for m in models)))
            for step in range(5):
                with torch.no_grad():
                    for fused_p, torch_p in pairs:
                        torch_p.copy_(fused_p)
                        if step:
                            for key in ("exp_avg", "exp_avg_sq"):
                                optimizers[1].state[torch_p][key].copy_(optimizers[0].state[fused_p][key])
                batches = [torch.randn(16, 64, device="cuda", dtype=dtype) for _ in range(3)]
                for model in models:
                    for x in batches:
                        (model(x).float().square().mean() / 3).backward()
                for fused_p, torch_p in pairs:
                    got, want = optimizers[0].state[fused_p], optimizers[1].state[torch_p]
                    if second_moment == "summed":      # m untouched, v's words: v rounded | the bfloat16 sum
                        assert torch.equal(got["exp_avg_sq"].view(torch.int32), want["exp_avg_sq"].view(torch.int32))
                        assert torch.equal(got["exp_avg"], want["exp_avg"])
                    else:
                        for key in ("exp_avg", "exp_avg_sq"):
                            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-9)
                for optimizer in optimizers:
                    optimizer.step()
                for fused_p, torch_p in pairs:
                    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)
                    torch.testing.assert_close(fused_p, torch_p, **tol)
            for optimizer in optimizers:
                optimizer.remove_hooks()

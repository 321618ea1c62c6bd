"""AdamA's one-kernel fold (lowbit/kernels/adama_fold_triton.py) equals the PyTorch path of AdamA._fold and a
float64 evaluation of the same formula (TRITON_INTERPRET=1 on CPU, in a subprocess so the interpreter setting
cannot leak into other tests)."""
import os
import subprocess
import sys
from pathlib import Path

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


def test_fused_fold_kernel_equals_the_pytorch_path_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    code = "from tests.kernels.test_adama_fold import check_kernel; check_kernel()"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "48 cases" in result.stdout

"""Does delayed scaling make a tensorwise FP8 quantization one pass under torch.compile? (issue 3, end to end)

Current (dynamic) scaling needs the tensor's amax before the cast: Inductor emits a reduction kernel and then the
cast kernel, both reading the producer's inputs. With the scale known beforehand (from an amax history, as
TransformerEngine's DelayedScaling), the cast and the amax for the next step read the inputs once -- if Inductor fuses
them. Two producers from a llama_1b layer, 8192 tokens: the RMSNorm before q/k/v (fp32 residual [T, 2048]) and the
SwiGLU backward (dact, gate, up bf16 [T, 8192] -> two quantized gradients). Delayed variants: the next amax of the
values, of the stored codes (|q| / scale, saturated), or as per-row maxima and then their maximum. Prints each
variant's compiled time (CUDA events, median), the kernels it runs (profiler) and the bytes it must move at least, as
a share of the device copy. Measured on an H200 (docs/RESULTS.md, twenty-sixth session): Inductor keeps the amax and
the cast in separate passes; the best delayed variant is ~12% faster on the SwiGLU backward.

    python bench/delayed_fusion.py
"""
from __future__ import annotations

import argparse

import torch

from attention import timed      # bench/attention.py: median of CUDA-event timings

E4M3 = torch.float8_e4m3fn
MAX = 448.0


def cast(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (y.float() * scale).clamp(-MAX, MAX).to(E4M3)


def current_scale(y: torch.Tensor) -> torch.Tensor:
    return MAX / y.abs().amax().float().clamp(min=1e-12)


def rmsnorm(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    return (w * y).to(torch.bfloat16)


def norm_current(h, w):
    y = rmsnorm(h, w)
    scale = current_scale(y)
    return cast(y, scale), scale


def norm_delayed(h, w, scale):
    y = rmsnorm(h, w)
    return cast(y, scale), y.abs().amax()


def norm_delayed_codes(h, w, scale):
    """The next amax from the stored codes (|q| / scale, saturated at 448 / scale): a reduction over the cast's own
    output, which Inductor may compute in the cast's loop."""
    q = cast(rmsnorm(h, w), scale)
    return q, q.float().abs().amax() / scale


def norm_delayed_rows(h, w, scale):
    """The next amax as per-row maxima (a reduction over the cast's own iteration space, which Inductor fuses with
    the row-wise work) and then the maximum over rows (a small second reduction)."""
    y = rmsnorm(h, w)
    return cast(y, scale), y.abs().amax(-1).amax()


def swiglu_grads(dact, g, u):
    gf, uf, df = g.float(), u.float(), dact.float()
    sig = torch.sigmoid(gf)
    silu = gf * sig
    dg = (df * uf * sig * (1 + gf * (1 - sig))).to(torch.bfloat16)
    du = (df * silu).to(torch.bfloat16)
    return dg, du


def swiglu_current(dact, g, u):
    dg, du = swiglu_grads(dact, g, u)
    sg, su = current_scale(dg), current_scale(du)
    return cast(dg, sg), cast(du, su), sg, su


def swiglu_delayed(dact, g, u, sg, su):
    dg, du = swiglu_grads(dact, g, u)
    return cast(dg, sg), cast(du, su), dg.abs().amax(), du.abs().amax()


def differ(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of FP8 codes that differ (the graphs may round the producer's float math differently)."""
    return (a.view(torch.uint8) != b.view(torch.uint8)).float().mean().item()


def swiglu_delayed_codes(dact, g, u, sg, su):
    dg, du = swiglu_grads(dact, g, u)
    qg, qu = cast(dg, sg), cast(du, su)
    return qg, qu, qg.float().abs().amax() / sg, qu.float().abs().amax() / su


def swiglu_delayed_rows(dact, g, u, sg, su):
    dg, du = swiglu_grads(dact, g, u)
    return cast(dg, sg), cast(du, su), dg.abs().amax(-1).amax(), du.abs().amax(-1).amax()


def kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA" and "Memcpy" not in e.name]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    t = args.tokens
    dev = "cuda"
    torch.manual_seed(0)
    h = torch.randn(t, 2048, device=dev)
    w = torch.rand(2048, device=dev) + 0.5
    dact, g, u = (torch.randn(t, 8192, device=dev, dtype=torch.bfloat16) for _ in range(3))
    src = torch.empty(t * 8192 * 6, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = timed(lambda: dst.copy_(src), reps=30)
    copy_bw = 2 * src.numel() / copy_ms / 1e9          # TB/s
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; copy {copy_bw:.2f} TB/s", flush=True)

    cases = {}
    nc, nd = torch.compile(norm_current), torch.compile(norm_delayed)
    q_ref, s_ref = nc(h, w)
    q_del, amax = nd(h, w, s_ref)
    print(f"rmsnorm: codes differing between the two compiled graphs {differ(q_ref, q_del):.2e}, scale from the fused "
          f"amax {float(MAX / amax.float()):.6g} against {float(s_ref):.6g}", flush=True)
    min_norm = t * 2048 * (4 + 1)                       # read h fp32, write fp8
    cases["rmsnorm -> e4m3, current"] = (lambda: nc(h, w), min_norm)
    cases["rmsnorm -> e4m3, delayed"] = (lambda: nd(h, w, s_ref), min_norm)

    sc, sd = torch.compile(swiglu_current), torch.compile(swiglu_delayed)
    qg, qu, sg, su = sc(dact, g, u)
    qg2, qu2, ag, au = sd(dact, g, u, sg, su)
    print(f"swiglu: codes differing {differ(qg, qg2):.2e} / {differ(qu, qu2):.2e}, scales from the fused amax "
          f"{float(MAX / ag.float()):.6g} / {float(MAX / au.float()):.6g} against {float(sg):.6g} / {float(su):.6g}",
          flush=True)
    ndc = torch.compile(norm_delayed_codes)
    cases["rmsnorm -> e4m3, delayed, amax of the codes"] = (lambda: ndc(h, w, s_ref), min_norm)
    ndr = torch.compile(norm_delayed_rows)
    cases["rmsnorm -> e4m3, delayed, row maxima"] = (lambda: ndr(h, w, s_ref), min_norm)
    sdc = torch.compile(swiglu_delayed_codes)
    sdr = torch.compile(swiglu_delayed_rows)
    min_swiglu = t * 8192 * (6 + 2)                      # read dact, g, u bf16; write two fp8
    cases["swiglu backward -> 2 x e4m3, current"] = (lambda: sc(dact, g, u), min_swiglu)
    cases["swiglu backward -> 2 x e4m3, delayed"] = (lambda: sd(dact, g, u, sg, su), min_swiglu)
    cases["swiglu backward -> 2 x e4m3, delayed, amax of the codes"] = (lambda: sdc(dact, g, u, sg, su), min_swiglu)
    cases["swiglu backward -> 2 x e4m3, delayed, row maxima"] = (lambda: sdr(dact, g, u, sg, su), min_swiglu)

    print("\n| variant | ms | kernels | bytes moved at least / time, of copy |")
    print("|---|---|---|---|")
    for name, (fn, nbytes) in cases.items():
        ms = timed(fn, reps=30)
        names = kernels(fn)
        print(f"| {name} | {ms:.4f} | {len(names)}: {', '.join(n[:60] for n in names)} | "
              f"{nbytes / ms / 1e9 / copy_bw:.2f} |", flush=True)


if __name__ == "__main__":
    main()

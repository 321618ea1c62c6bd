"""The Gluon FP4 block pair kernel (lowbit/kernels/quantize_fp4_gluon.py). Gluon has no interpreter: on CPU the
kernel is compiled for sm_90 by Triton's own ptxas (a fresh process: Gluon functions decorated while
TRITON_INTERPRET=1 cannot be compiled) and its machine code checked; on a GPU its outputs equal the PyTorch
reference and the Triton kernel bit for bit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def sm90_binaries_in_fresh_process(*calls) -> list[dict]:
    """quantize_fp4_gluon.sm90_binary(*args, **kwargs) for each (args, kwargs) in calls, in one new interpreter
    (Gluon functions decorated while TRITON_INTERPRET=1 cannot be compiled): counts instead of the SASS text."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    code = ("import json; from lowbit.kernels.quantize_fp4_gluon import sm90_binary\n"
            f"for args, kwargs in {list(calls)!r}:\n"
            "    d = sm90_binary(*args, **kwargs); d['stg128'] = d['sass'].count('STG.E.128')\n"
            "    d['ldg128'] = d['sass'].count('LDG.E.128'); d.pop('sass'); print(json.dumps(d))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.strip().splitlines()[-len(calls):]]


@pytest.mark.parametrize("block,rule", [(32, "pow2"), (16, "nvfp4")])
def test_fp4_pair_kernel_compiles_for_sm90_without_shared_memory(block, rule):
    """No value crosses a thread: no shared memory at all, no spills; x's side loads its blocks with 16-byte loads
    and both sides store 16-byte vectors (a thread's 64 values per side at the default tile: 64 bytes of x_q and
    64 of x^T_q, four 16-byte stores each)."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    binary, = sm90_binaries_in_fresh_process(((block, rule), {"packed": rule == "pow2"}))
    assert binary["shared_bytes"] == 0 and binary["spill_bytes"] == 0, binary
    assert binary["stg128"] == 8, binary
    assert binary["ldg128"] == 8, binary          # x's side: 64 bf16 values per thread, 128 bytes


def f16x2_steps(v: torch.Tensor) -> torch.Tensor:
    """quantize_fp4_gluon._e2m1_bytes_f16x2's PTX steps, one by one in numpy's float16 (sums exact in float32, then
    rounded once, as fma.rn.f16x2 rounds them): E4M3 bytes."""
    import numpy as np

    h = v.numpy().astype(np.float16)                                      # cvt.rn.f16x2.f32
    with np.errstate(invalid="ignore"):
        s = np.minimum(np.abs(h), np.float16(6.0))                        # min.NaN.xorsign.abs with +6
    s = np.where(np.isnan(h), h, np.where(np.signbit(h), -s, s)).astype(np.float16)
    sign = s.view(np.uint16) & 0x8000
    binade = np.maximum((s.view(np.uint16) & 0x7C00).view(np.float16), np.float16(1.0))   # and, max.f16x2
    magic = binade.astype(np.float32) * 768
    t = (s.astype(np.float32) + magic).astype(np.float16)                 # fma.rn.f16x2 b, 768, s
    r = (t.astype(np.float32) - magic).astype(np.float16)                 # fma.rn.f16x2 b, -768, t
    r = (r.view(np.uint16) | sign).view(np.float16)                       # or: the sign of -0
    return torch.from_numpy(r.astype(np.float32)).to(torch.float8_e4m3fn).view(torch.uint8)


def test_f16x2_e2m1_steps_equal_reference_for_every_bfloat16_times_a_power_of_two():
    """Why the packed rounding is exact for MXFP4 of bf16: every finite bfloat16 x times 2^k (k from -20 to 20,
    MXFP4's scales) rounds onto E2M1 as formats.round_to_format does (the ties, -0, the saturation at 6 and values
    too small for f16 included), by the PTX's steps in float16. The PTX itself: the GPU test below."""
    from lowbit.precision.formats import E2M1, round_to_format

    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    for k in (-20, -5, -3, -1, 0, 1, 2, 5, 20):
        v = x * 2.0 ** k
        v = v[torch.isfinite(v)]
        want = round_to_format(v, E2M1).to(torch.float8_e4m3fn).view(torch.uint8)
        got = f16x2_steps(v)
        assert torch.equal(got, want), (k, v[got != want][:8])


def test_launch_warps_reach_the_compiler():
    """num_warps is a launch option, not a kernel parameter (a parameter of that name would take the launch's
    value and leave the compiler at its default of 4 warps, against layouts spanning 1 or 2): the layouts read
    gl.num_warps()."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    from lowbit.kernels.quantize_fp4_gluon import fp4_pair_kernel

    assert "num_warps" not in fp4_pair_kernel.arg_names


def test_every_variant_compiles_for_sm90_without_spills():
    """Each input dtype, rule, rounding and transposition the wrapper can launch (and the other tiles the bench
    times) compiles for sm_90 with no register spills; the shared-memory transposition uses shared memory, the
    second load none."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    calls = [((block, rule), {"dtype": dtype, "packed": packed, "reload": reload})
             for dtype in ("bf16", "fp16", "fp32") for block, rule in ((32, "pow2"), (16, "nvfp4"))
             for packed in ((False, True) if rule == "pow2" and dtype != "fp32" else (False,))
             for reload in (True, False)]
    calls += [((32, "pow2", (32, 256, 4, 2)), {"packed": True}), ((16, "nvfp4", (16, 256, 2, 4)), {})]
    for (args, kwargs), binary in zip(calls, sm90_binaries_in_fresh_process(*calls)):
        assert binary["spill_bytes"] == 0, (args, kwargs, binary)
        assert (binary["shared_bytes"] == 0) == kwargs.get("reload", True), (args, kwargs, binary)


def fp4_cases():
    """(x, quantizer) pairs: odd tile remainders in both dimensions, a zero block, tiny and huge blocks, an outlier
    per row; bf16, fp16 and fp32 inputs."""
    from lowbit.precision.formats import E2M1
    from lowbit.precision.scaling import Quantizer

    generator = torch.Generator().manual_seed(0)
    for rule, block in (("nvfp4", 16), ("pow2", 32)):
        q = Quantizer(E2M1, 1, block, rule)
        for (rows, cols), dtype in (((block * 3, block * 5), torch.bfloat16), ((block * 9, 640), torch.bfloat16),
                                    ((block * 2, block * 11), torch.float16), ((block * 5, 384), torch.float32)):
            x = torch.randn(rows, cols, generator=generator) * 3
            x[0, :block] = 0.0                                    # an all-zero block on both sides
            x[1, block:2 * block] *= 1e-30                        # a tiny block
            x[-1, -block:] *= 1e4                                 # a huge one
            x[torch.arange(rows), torch.randint(0, cols, (rows,), generator=generator)] *= 50
            yield x.clamp(-6e4, 6e4).to(dtype), q      # finite in float16
    yield e2m1_edge_tile(), Quantizer(E2M1, 1, 32, "pow2")


def e2m1_edge_tile(rows: int = 96, cols: int = 160) -> torch.Tensor:
    """bfloat16 x whose every MXFP4 block on both sides (1 x 32 along rows and down columns) has amax in [4, 8), so
    its power-of-two scale is 1 and x itself is rounded onto E2M1: the grid points, the ties between them, their
    bfloat16 neighbours, values past the saturation, signed zeros and tiny values, with random signs."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    points = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, torch.tensor([6.5, 7.0, 7.9375, 1e-30, 1e-39])])
    points = points.to(torch.bfloat16)
    bits = points.view(torch.int16)
    around = torch.cat([points, (bits + 1).view(torch.bfloat16), (bits[bits > 0] - 1).view(torch.bfloat16)])
    generator = torch.Generator().manual_seed(3)
    x = around[torch.randint(0, around.numel(), (rows, cols), generator=generator)]
    x = torch.where(torch.rand(rows, cols, generator=generator) < 0.5, -x, x)
    index = torch.arange(rows)[:, None] + torch.arange(cols)[None, :]
    x = torch.where(index % 32 == 0, torch.tensor(4.0, dtype=torch.bfloat16), x)     # one 4.0 in every block
    return x.clamp(-7.9375, 7.9375)


def pair_by(kernel: str, x: torch.Tensor, q, packed: bool = False):
    """quantize_blocks_triton(x, q, q) with FP4_PAIR_KERNEL = kernel ("triton": its own kernel, E2M1 in f16x2 if
    `packed`; "gluon": handed to quantize_fp4_gluon where supported)."""
    from lowbit.kernels import quantize_blocks_triton as blocks
    saved = blocks.FP4_PAIR_KERNEL, blocks.TRITON_PACKED
    blocks.FP4_PAIR_KERNEL, blocks.TRITON_PACKED = kernel, packed
    try:
        return blocks.quantize_blocks_triton(x, q, q), blocks.use_gluon_pair(x, q, q)
    finally:
        blocks.FP4_PAIR_KERNEL, blocks.TRITON_PACKED = saved


def triton_pair(x: torch.Tensor, q):
    return pair_by("triton", x, q)[0]


@pytest.mark.parametrize("name, value, message", [
    ("LOWBIT_FP4_PAIR_KERNEL", "cutlass", "LOWBIT_FP4_PAIR_KERNEL='cutlass': use one of ('gluon', 'triton')"),
    ("LOWBIT_FP4_PAIR_PROGRAMS_PER_SM", "-2",
     "LOWBIT_FP4_PAIR_PROGRAMS_PER_SM='-2': give a non-negative integer (or leave it unset: 0)"),
    ("LOWBIT_FP4_PAIR_MAXNREG", "many", "LOWBIT_FP4_PAIR_MAXNREG='many': give a non-negative integer")])
def test_bad_fp4_pair_setting_is_refused_by_name(name, value, message):
    env = dict(os.environ, **{name: value})
    run = subprocess.run([sys.executable, "-c", "import lowbit.kernels.quantize_blocks_triton"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode != 0
    assert message in run.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp4_pair_gluon_equals_reference_and_triton_on_gpu():
    """Both FP4 pair kernels (Gluon: both roundings, two tiles; Triton: float32 steps and, for MXFP4 of bf16/fp16,
    f16x2) and the dispatch, bit for bit against the PyTorch reference; NVFP4 also with max |x| given."""
    from lowbit.kernels.quantize_fp4_gluon import TILES, packed_rounding, quantize_fp4_pair_gluon, supports
    from lowbit.precision.scaling import quantize_reference

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the Gluon kernel needs Hopper or newer")
    checked = 0
    for x, q in fp4_cases():
        x = x.cuda()
        assert supports(x, q, q)
        want = (quantize_reference(x, q), quantize_reference(x.t(), q))
        rows, cols, warps, per_thread = TILES[q.block_cols]
        tiles = [None, (rows, 2 * cols, 2 * warps, per_thread)]
        packs = (False, True) if packed_rounding(x, q) else (False,)
        for tile, packed in [(tile, packed) for tile in tiles for packed in packs]:
            got = quantize_fp4_pair_gluon(x, q, tile=tile, packed=packed)
            triton_got, handed = pair_by("triton", x, q)
            dispatched, handed_gluon = pair_by("gluon", x, q)
            triton_packed = pair_by("triton", x, q, packed=True)[0]     # f16x2 where it applies, else the same
            assert not handed and handed_gluon
            for side, (g, w, t) in enumerate(zip(got, want, triton_got)):
                what = f"{q.scale_rule} {tuple(x.shape)} {x.dtype} tile {tile} packed {packed} side {side}"
                assert torch.equal(g.data.view(torch.uint8), w.data.view(torch.uint8)), what
                assert torch.equal(g.scale.view(torch.int32), w.scale.view(torch.int32)), what
                assert torch.equal(g.data.view(torch.uint8), t.data.view(torch.uint8)), what
                assert torch.equal(dispatched[side].data.view(torch.uint8), w.data.view(torch.uint8)), what
                assert torch.equal(triton_packed[side].data.view(torch.uint8), w.data.view(torch.uint8)), what
                if q.scale_rule == "nvfp4":
                    assert torch.equal(g.gain, w.gain) and torch.equal(g.gain, t.gain), what
            if q.scale_rule == "nvfp4":      # max |x| given (no amax pass): the same bits
                given = quantize_fp4_pair_gluon(x, q, x.abs().amax().float().reshape(1), tile=tile)
                for g, w in zip(given, want):
                    assert torch.equal(g.data.view(torch.uint8), w.data.view(torch.uint8)), f"{tuple(x.shape)} given"
                    assert torch.equal(g.scale.view(torch.int32), w.scale.view(torch.int32)), f"{tuple(x.shape)} given"
                    assert torch.equal(g.gain, w.gain)
            checked += 1
    assert checked == 26          # NVFP4 4 cases x 2 tiles; MXFP4 4 bf16/fp16 cases x 2 tiles x 2, fp32 x 2 tiles


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp4_pair_gluon_reports_a_non_finite_block_as_triton_does():
    """A NaN or Inf in x: NaN scales for its blocks (no host sync; scaling.check_finite), as the Triton kernel."""
    from lowbit.kernels.quantize_fp4_gluon import quantize_fp4_pair_gluon
    from lowbit.precision.formats import E2M1
    from lowbit.precision.scaling import NonFiniteAmaxError, Quantizer

    q = Quantizer(E2M1, 1, 32, "pow2")
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    x[5, 40] = float("nan")
    x[33, 200] = float("inf")
    outcomes = []
    for quantize in (quantize_fp4_pair_gluon, triton_pair):
        try:
            first, second = quantize(x, q)
            outcomes.append((torch.isnan(first.scale).nonzero().tolist(), torch.isnan(second.scale).nonzero().tolist()))
        except NonFiniteAmaxError as error:
            outcomes.append(str(error))
    assert outcomes[0] == outcomes[1]
    assert isinstance(outcomes[0], str) or outcomes[0][0] == [[5, 1], [33, 6]]


def test_fp4_pair_gluon_refuses_what_it_cannot_do_by_name():
    """Off a Hopper GPU, or for a quantizer other than an FP4 1 x 16/32 pair, the wrapper names the input and the
    kernel to use instead (quantize_blocks_triton, which never hands such calls to it)."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    from lowbit.kernels.quantize_blocks_triton import use_gluon_pair
    from lowbit.kernels.quantize_fp4_gluon import quantize_fp4_pair_gluon
    from lowbit.precision.formats import E2M1, E4M3
    from lowbit.precision.scaling import Quantizer

    x = torch.randn(64, 64, dtype=torch.bfloat16)
    for q in (Quantizer(E2M1, 1, 32, "pow2"), Quantizer(E4M3, 1, 128)):
        assert not use_gluon_pair(x, q, q)
        with pytest.raises(ValueError, match="use quantize_blocks_triton"):
            quantize_fp4_pair_gluon(x, q)


def test_triton_kernel_with_f16x2_rounding_compiles_for_sm90():
    """The Triton block kernel's f16x2 E2M1 (quantize_blocks_triton.TRITON_PACKED, on by default on GPUs), MXFP4
    pair at its default tile, compiled for sm_90 by bench/ptx_mix.py's compile_kernel: the packed steps are there
    (HFMA2, the f16x2 -> e4m3x2 cast), x_q is stored 8 bytes per thread as dispatched (NARROW_PAIR_STORE: the hint
    took effect) and nothing spills. Its numerics: the GPU test above and the emulation test."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    code = ("import json, sys; sys.path.insert(0, 'bench'); from ptx_mix import FORMATS, compile_kernel, registers\n"
            "from lowbit.kernels import quantize_blocks_triton as blocks\n"
            "rule, block = FORMATS['mxfp4']\n"
            "asm = compile_kernel(rule, block, blocks.FP4_PAIR_TILES[block], True, True, packed=True,"
            " narrow=blocks.NARROW_PAIR_STORE)\n"
            "from triton.tools.disasm import get_sass\n"
            "sass = get_sass(asm['cubin'])\n"
            "print(json.dumps({'hfma2': sass.count('HFMA2'), 'cast': sass.count('F2FP.SATFINITE.E4M3.F16'),"
            " 'store64': sass.count('STG.E.64'), 'narrow': blocks.NARROW_PAIR_STORE,"
            " 'usage': registers(asm['cubin'])}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["hfma2"] > 0 and found["cast"] > 0, found
    assert found["store64"] > 0 or not found["narrow"], found
    assert "stack 0 B" in found["usage"], found

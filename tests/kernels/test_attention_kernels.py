"""Attention kernels for SeerAttention (issue 4): fused target kernel and block-sparse attention.

The Triton kernels run in the interpreter (TRITON_INTERPRET=1, set before they are first built) on
small odd shapes; each is compared with its PyTorch path, and both with float64 math. On a CUDA
machine they run on the GPU instead (fp32 dots there use TF32, hence the looser tolerance), and the
interpreter is left off so that other modules' kernels are compiled for the GPU.
"""
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_TOL = 1e-3 if DEVICE == "cpu" else 2e-2


def on_device(fn):
    """Run a Triton path on DEVICE, returning CPU tensors."""
    def wrapped(*tensors, **kwargs):
        out = fn(*[t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors], **kwargs)
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()
    wrapped.__name__ = fn.__name__
    return wrapped

from lowbit.kernels.attention_target import (attention_block_target_torch, attention_block_target_triton,
                                             attention_with_block_target)
from lowbit.kernels.block_sparse_attention import (block_sparse_attention_torch, block_sparse_attention_triton,
                                                   kept_block_lists)


def naive_float64(q, k, v, block_size):
    """Full S x S causal attention map in float64, max-pooled to blocks, normalised over key blocks."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    seq, head_dim = q.shape[2], q.shape[3]
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores.masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), float("-inf"))
    probs = scores.softmax(-1)
    n = math.ceil(seq / block_size)
    target = torch.zeros(*q.shape[:2], n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            tile = probs[:, :, i * block_size:(i + 1) * block_size, j * block_size:(j + 1) * block_size]
            target[:, :, i, j] = tile.amax(dim=(-1, -2))
    return probs @ v, target / target.sum(-1, keepdim=True)


def random_qkv(batch, q_heads, kv_heads, seq, head_dim, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seq, head_dim, generator=g) * 1.5
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=g) * 1.5
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("seq,block,q_heads,kv_heads,head_dim", [(37, 16, 4, 2, 16), (53, 16, 3, 1, 32),
                                                                  (70, 32, 2, 2, 16)])
def test_target_torch_and_triton_equal_float64(seq, block, q_heads, kv_heads, head_dim):
    q, k, v = random_qkv(2, q_heads, kv_heads, seq, head_dim)
    out64, target64 = naive_float64(q, k, v, block)
    for path, tol in ((attention_block_target_torch, 1e-3), (on_device(attention_block_target_triton), TRITON_TOL)):
        out, target = path(q, k, v, block)
        assert target.shape == target64.shape and target.dtype == torch.float32
        torch.testing.assert_close(target.double(), target64, atol=tol, rtol=0, msg=path.__name__)
        torch.testing.assert_close(out.double(), out64, atol=tol, rtol=0, msg=path.__name__)
    assert torch.allclose(target64.sum(-1), torch.ones(()).double())
    assert (target64.triu(1) == 0).all()


@pytest.mark.parametrize("seq,block,block_m,block_n,tma", [
    (100, 16, 16, 0, False), (100, 16, 64, 0, False), (75, 32, 128, 0, False), (100, 16, 64, 32, False),
    (100, 16, 16, 32, False), (75, 32, 128, 64, False), (90, 16, 32, 64, False),
    (100, 16, 16, 0, True), (100, 16, 64, 32, True), (75, 32, 128, 64, True), (90, 16, 32, 64, True)])
def test_target_kernel_tiles_of_several_query_blocks_and_shared_scratch(seq, block, block_m, block_n, tma):
    """block_m query rows per tile (1, 2 or 4 query blocks, a partial last tile), block_n keys per tile (one
    gate block, or 2 or 4 pooled from one MMA; key tiles longer than query tiles too), more work items than
    persistent programs (each program reuses its row-maximum scratch), GQA 6:2; K/V tiles by pointers or by
    tensor descriptors (rows past the sequence end read as zeros)."""
    q, k, v = random_qkv(1, 6, 2, seq, 16, seed=seq + block_m + block_n)
    out64, target64 = naive_float64(q, k, v, block)
    out, target = on_device(attention_block_target_triton)(q, k, v, block, block_m=block_m, block_n=block_n,
                                                           tma=tma)
    torch.testing.assert_close(target.double(), target64, atol=TRITON_TOL, rtol=0)
    torch.testing.assert_close(out.double(), out64, atol=TRITON_TOL, rtol=0)
    with pytest.raises(ValueError, match="block_m=24 and block_n=16 must be multiples of block_size=16"):
        attention_block_target_triton(q, k, v, 16, block_m=24)
    with pytest.raises(ValueError, match="block_n=40 must be multiples of block_size=16"):
        attention_block_target_triton(q, k, v, 16, block_m=32, block_n=40)


def test_unknown_seer_kernel_names_the_value_and_the_choices():
    env = {**os.environ, "LOWBIT_SEER_KERNEL": "cudnn"}
    run = subprocess.run([sys.executable, "-c", "import lowbit.kernels.attention_target"], capture_output=True,
                         text=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert run.returncode != 0
    assert "LOWBIT_SEER_KERNEL='cudnn': use one of ('gluon', 'triton')" in run.stderr


def test_every_stage_probe_patch_applies_to_the_gluon_kernel():
    """bench/attention_probe.py times copies of the Gluon kernel with one stage left out, by text patches: each
    patch's text must still be in the kernel (else the probe would stop at its check on the GPU)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.attention_probe import PATCHES, SOURCE
    text = SOURCE.read_text()
    for name, patches in PATCHES.items():
        for old, new in patches:
            assert old in text, (name, old)
            assert old != new


def hopper_binary_in_fresh_process(*args, **kwargs) -> dict:
    """attention_target_gluon.hopper_binary(*args, **kwargs) in a new interpreter: Gluon functions decorated while
    TRITON_INTERPRET=1 (on for this module's other tests) cannot be compiled."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    code = ("import json, sys; from lowbit.kernels.attention_target_gluon import hopper_binary; "
            f"print(json.dumps(hopper_binary(*{args!r}, **{kwargs!r})))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2], timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_hopper_kernel_compiles_for_sm90_with_each_score_mma_waited_for_alone():
    """The Gluon (warp-specialised) kernel, compiled for sm_90 by Triton's ptxas on any machine: no register
    spills, and q k^T of tile j is waited for while P_(j-1) V_(j-1) is still in flight (a wgmma wait that leaves
    the P V groups outstanding), the overlap Triton's own compiler does not make. The K/V ring's shared-memory
    addresses stay in uniform registers in both key-tile loops: under Triton 3.6 (the GPU image's), a work item read
    from shared memory and not broadcast from one lane took 80 register-to-uniform moves (R2UR) per key tile there
    and up to 15% of the time on an H100 (Triton 3.9 keeps them uniform either way; bench/device_pending.sh runs
    this test under 3.6). Its numerics: the GPU test below."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    from lowbit.kernels.attention_target_gluon import key_tile_loops
    for head_dim, stages, dtype, tile_n, pingpong, dynamic in (
            (128, 2, "bf16", 64, False, True), (64, 3, "fp16", 64, False, True), (128, 2, "bf16", 128, False, True),
            (128, 2, "bf16", 128, True, True), (128, 2, "bf16", 128, False, False)):
        binary = hopper_binary_in_fresh_process(head_dim, stages, dtype, tile_n, pingpong=pingpong, dynamic=dynamic)
        assert binary["spill_bytes"] == 0, binary["spill_bytes"]
        loops = key_tile_loops(binary["sass"])
        assert len(loops) == 2, loops                  # one per consumer warpgroup
        for loop in loops:
            assert loop.get("R2UR", 0) < loop["HGMMA"] // 2, loop
        outstanding = tile_n // 64      # the P V MMAs (one per 64-key block) still running while S_j is waited for
        assert f"WARPGROUP.DEPBAR.LE gsb0, {hex(outstanding)}" in binary["sass"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the Gluon kernel runs on sm_90 only")
@pytest.mark.parametrize("batch,q_heads,kv_heads,seq,head_dim,dtype", [
    (1, 8, 2, 1000, 128, torch.bfloat16), (2, 4, 4, 200, 128, torch.bfloat16), (1, 2, 1, 64, 128, torch.float16),
    (1, 3, 1, 2049, 64, torch.bfloat16), (3, 2, 2, 130, 64, torch.float16)])
def test_hopper_kernel_equals_torch_path_and_triton_kernel(batch, q_heads, kv_heads, seq, head_dim, dtype):
    """Partial last query tiles, GQA, both head dims and half types, against the PyTorch path and the Triton kernel;
    with one program per SM (one work item each at these sizes) and with 3 programs (several items each: the K/V
    ring, the Q double buffer, the item handed from the loader and every barrier phase carried from one item to the
    next); items taken dynamically (the default) and statically, in groups of the L2-sized default, of 1 query head
    and of 3 (a smaller last group where 3 does not divide the heads). Every call after the first of its kind (tile,
    stages, schedule) launches through the cached compiled kernel, on shapes other than the first call's."""
    from lowbit.kernels.attention_target import attention_block_target_gluon
    q, k, v = (t.cuda() for t in random_qkv(batch, q_heads, kv_heads, seq, head_dim, seed=seq, dtype=dtype))
    out_ref, target_ref = attention_block_target_torch(q, k, v, 64)
    out_triton, target_triton = attention_block_target_triton(q, k, v, 64)
    settings = [(config, programs, 0, True) for config, programs in itertools.product(
        ((2, 64, False), (3, 64, False), (2, 128, False), (2, 128, True)), (0, 3))]
    settings += [((2, 128, False), programs, head_group, dynamic) for programs, head_group, dynamic in
                 itertools.product((0, 3), (0, 1, 3), (True, False)) if head_group or not dynamic]
    for (stages, tile_n, pingpong), programs, head_group, dynamic in settings:
        out, target = attention_block_target_gluon(q, k, v, 64, stages=stages, tile_n=tile_n, pingpong=pingpong,
                                                   programs=programs, head_group=head_group, dynamic=dynamic)
        torch.testing.assert_close(target, target_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.float(), out_ref.float(), atol=2e-2, rtol=0)
        torch.testing.assert_close(target, target_triton, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.float(), out_triton.float(), atol=2e-2, rtol=0)


def test_torch_target_chunking_does_not_change_the_result():
    q, k, v = random_qkv(1, 2, 1, 100, 16, seed=3)
    a = attention_block_target_torch(q, k, v, 16, query_chunk_blocks=1)
    b = attention_block_target_torch(q, k, v, 16, query_chunk_blocks=16)
    torch.testing.assert_close(a, b)


def random_block_mask(batch, heads, n, seed, keep=0.5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, heads, n, n, generator=g) < keep
    mask |= torch.eye(n, dtype=torch.bool)
    mask[..., 0] = True
    return mask


@pytest.mark.parametrize("seq,block,q_heads,kv_heads,mask_heads", [(45, 16, 4, 2, 2), (45, 16, 4, 2, 4),
                                                                   (81, 32, 2, 1, 1)])
def test_block_sparse_all_kept_equals_dense_and_random_mask_equals_masked_dense(seq, block, q_heads, kv_heads,
                                                                                 mask_heads):
    q, k, v = random_qkv(2, q_heads, kv_heads, seq, 16, seed=1)
    n = math.ceil(seq / block)
    dense, _ = naive_float64(q, k, v, block)
    everything = torch.ones(2, mask_heads, n, n, dtype=torch.bool)
    for path, tol in ((block_sparse_attention_torch, 1e-4), (on_device(block_sparse_attention_triton), TRITON_TOL)):
        torch.testing.assert_close(path(q, k, v, everything, block).double(), dense, atol=tol, rtol=0)
    mask = random_block_mask(2, mask_heads, n, seed=seq)
    reference = block_sparse_attention_torch(q, k, v, mask, block)
    # independent float64 masked attention
    groups = q_heads // kv_heads
    token = mask.repeat_interleave(block, 2).repeat_interleave(block, 3)[..., :seq, :seq]
    token = token.repeat_interleave(q_heads // mask_heads, 1) & torch.ones(seq, seq, dtype=torch.bool).tril()
    scores = q.double() @ k.double().repeat_interleave(groups, 1).transpose(-1, -2) / 4.0
    expected = scores.masked_fill(~token, float("-inf")).softmax(-1) @ v.double().repeat_interleave(groups, 1)
    torch.testing.assert_close(reference.double(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(on_device(block_sparse_attention_triton)(q, k, v, mask, block).double(), expected,
                               atol=1e-4 if DEVICE == "cpu" else TRITON_TOL, rtol=0)


def test_block_sparse_kernel_in_half_precision_matches_dense_to_bf16_tolerance():
    q, k, v = random_qkv(1, 2, 1, 40, 16, seed=2, dtype=torch.float16)
    dense, _ = naive_float64(q, k, v, 16)
    out = on_device(block_sparse_attention_triton)(q, k, v, torch.ones(1, 1, 3, 3, dtype=torch.bool), 16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), dense, atol=2e-2, rtol=2e-2)


def test_kept_block_lists_are_causal_and_ordered():
    mask = torch.tensor([[[[1, 1, 1], [0, 1, 1], [1, 0, 1]]]], dtype=torch.bool)
    index, count = kept_block_lists(mask)
    assert count.tolist() == [[[1, 1, 2]]]
    assert index[0, 0, 2, :2].tolist() == [0, 2] and index[0, 0, 1, 0].item() == 1


def test_bad_inputs_name_the_value_and_the_fix():
    q, k, v = random_qkv(1, 2, 1, 10, 16)
    with pytest.raises(ValueError, match="shorter than one block"):
        attention_with_block_target(q, k, v, 16)
    q, k, v = random_qkv(1, 2, 1, 40, 24)
    with pytest.raises(ValueError, match="head_dim=24 is not supported"):
        attention_block_target_triton(q, k, v, 16)
    with pytest.raises(ValueError, match="block_size=20 is not supported"):
        attention_with_block_target(q, k, v, 20)
    with pytest.raises(ValueError, match="block_mask has shape"):
        block_sparse_attention_torch(q, k, v, torch.ones(1, 3, 3, 3, dtype=torch.bool), 16)


def test_kernels_are_custom_ops_with_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowbit.kernels.block_sparse_attention import block_sparse_attention

    with FakeTensorMode():
        q, k, v = torch.empty(1, 4, 40, 16), torch.empty(1, 2, 40, 16), torch.empty(1, 2, 40, 16)
        out, target = attention_with_block_target(q, k, v, 16, use_triton="never")
        assert out.shape == q.shape and target.shape == (1, 4, 3, 3) and target.dtype == torch.float32
        mask = torch.ones(1, 2, 3, 3, dtype=torch.bool)
        assert block_sparse_attention(q, k, v, mask, 16, use_triton="never").shape == q.shape
    q, k, v = random_qkv(1, 4, 2, 40, 16)
    torch.testing.assert_close(attention_with_block_target(q, k, v, 16, use_triton="never"),
                               attention_block_target_torch(q, k, v, 16))
    assert torch.ops.lowbit.seer_attention_target.default is not None

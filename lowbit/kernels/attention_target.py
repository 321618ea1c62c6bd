"""Causal attention forward that also returns SeerAttention's block-level distillation target.

`attention_with_block_target(q, k, v, block_size)` returns
  out    [batch, q_heads, seq, head_dim]   softmax(q k^T * scale, causal) v, in q's dtype
  target [batch, q_heads, n_blocks, n_blocks] float32: the attention map P max-pooled over
         (query block x key block) tiles, then normalised over key blocks (arXiv 2410.13276 sec. 3.2,
         the "ground truth" of the AttnGate; blocks above the diagonal are 0, each row sums to 1).

The Triton kernel never materialises P and makes one pass over q k^T: a persistent program takes a
(query tile, batch x head) work item, runs the flash-attention forward (online softmax, Dao et al.)
over the causal key blocks and stores, per key block, each query row's score maximum into a small
scratch. Once the row log-sum-exp is final, exp2(row max - lse) is that row's largest probability in
the block, and the target entry is its maximum over the query block's rows.
Extra memory: the target itself, O(S^2/B^2) per head, plus one [S/B, 128] float32 scratch per
persistent program (2 per SM), O(S) in all and independent of the head count. microsoft/SeerAttention's
kernel stores the row-wise block maxima of every query row, O(S * S/B) per head, and pools afterwards.

GQA: k/v carry `kv_heads` heads, query head h reads kv head h // (q_heads // kv_heads).
Sequences need not be multiples of `block_size`: the last block is partial and pooled over the
tokens it holds. The pure-PyTorch path (`attention_block_target_torch`) has the same numerics and
is used on CPU and as the test reference; the tests check both against float64 math.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from lowbit.kernels import use_triton_for

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> None:
    """Shapes [B, Hq, S, D] / [B, Hkv, S, D]; errors name the bad value and the fix."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, heads, seq, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match q {tuple(q.shape)} in batch, "
                         f"sequence and head_dim (self-attention prefill)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} heads, not a multiple of the {k.shape[1]} kv heads (GQA)")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size={block_size} is not supported; use one of {SUPPORTED_BLOCK_SIZES}")
    if q.shape[2] < block_size:
        raise ValueError(f"sequence length {q.shape[2]} is shorter than one block of {block_size} tokens; "
                         f"use longer sequences or a smaller block size")


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * groups, S, D] (query head h reads kv head h // groups)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def block_pool_max(x: torch.Tensor, block_size: int, dim: int) -> torch.Tensor:
    """Max over consecutive blocks of `block_size` along `dim` (last block may be partial)."""
    n = x.shape[dim]
    pad = (-n) % block_size
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_full(shape, float("-inf"))], dim=dim)
    x = x.unflatten(dim, (x.shape[dim] // block_size, block_size))
    return x.amax(dim=dim + 1)


def attention_block_target_torch(q, k, v, block_size: int, scale: float | None = None,
                                 query_chunk_blocks: int = 16):
    """PyTorch path: query blocks in chunks, so memory is O(chunk x S) rather than S x S.

    Same contract as `attention_with_block_target`; math in float32.
    """
    check_attention_inputs(q, k, v, block_size)
    batch, q_heads, seq, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    groups = q_heads // k.shape[1]
    kf, vf = repeat_kv(k, groups).float(), repeat_kv(v, groups).float()
    n_blocks = math.ceil(seq / block_size)
    out = torch.empty_like(q)
    target = q.new_zeros((batch, q_heads, n_blocks, n_blocks), dtype=torch.float32)
    key_pos = torch.arange(seq, device=q.device)
    rows = query_chunk_blocks * block_size
    for start in range(0, seq, rows):
        stop = min(seq, start + rows)
        scores = torch.einsum("bhqd,bhkd->bhqk", q[:, :, start:stop].float(), kf) * scale
        causal = key_pos[None, :] <= torch.arange(start, stop, device=q.device)[:, None]
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[:, :, start:stop] = torch.einsum("bhqk,bhkd->bhqd", probs, vf).to(q.dtype)
        pooled = block_pool_max(block_pool_max(probs, block_size, dim=3), block_size, dim=2)
        target[:, :, start // block_size:start // block_size + pooled.shape[2]] = pooled
    return out, target / target.sum(-1, keepdim=True)


@functools.cache
def _kernels():
    """The Triton kernel, imported on first use (TRITON_INTERPRET is read when the kernel is decorated)."""
    from lowbit.kernels.attention_target_triton import attention_target_kernel
    return attention_target_kernel


@functools.cache
def _cuda_facts(index: int) -> tuple[tuple[int, int], int, int]:
    """(compute capability, SMs, L2 bytes) of CUDA device `index`, read once: torch.cuda.get_device_properties
    costs microseconds of host time per call, and every launch wants these."""
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count, props.L2_cache_size


def cuda_facts(device: torch.device) -> tuple[tuple[int, int], int, int]:
    return _cuda_facts(torch.cuda.current_device() if device.index is None else device.index)


def _program_slots(device: torch.device, work_items: int, per_sm: int = 2) -> int:
    """Persistent programs: enough to fill the GPU (`per_sm` per SM), never more than there is work."""
    if device.type != "cuda":
        return min(work_items, 4)
    return min(work_items, per_sm * cuda_facts(device)[1])


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int, tma: bool):
    """Host tensor descriptors of K and V viewed as [batch x kv_heads, seq, head_dim] (tiles of block_n keys),
    or (k, v) again when the kernel loads by pointers (its descriptor arguments are then unused)."""
    if not tma:
        return k, v
    from triton.tools.tensor_descriptor import TensorDescriptor
    views = [t.view(t.shape[0] * t.shape[1], t.shape[2], t.shape[3]) for t in (k, v)]
    return tuple(TensorDescriptor.from_tensor(t, [1, block_n, t.shape[2]]) for t in views)


def use_tma(k: torch.Tensor) -> bool:
    """K/V tiles by the tensor-memory accelerator: Hopper and newer (capability >= 9), 16-byte aligned rows.
    Measured on an H200 (docs/RESULTS.md, issue 4): 1-2% faster than pointer loads with 64-key tiles."""
    return (k.is_cuda and cuda_facts(k.device)[0][0] >= 9 and k.data_ptr() % 16 == 0
            and (k.shape[-1] * k.element_size()) % 16 == 0)


def attention_block_target_triton(q, k, v, block_size: int, scale: float | None = None, num_warps: int = 0,
                                  num_stages: int = 0, block_m: int = 0, block_n: int = 0, tma: bool | None = None,
                                  programs_per_sm: int = 2):
    """Triton path (CUDA, or CPU with TRITON_INTERPRET=1); same contract as the torch path.

    Tiles: `block_m` query rows and `block_n` keys (default: one gate block, `block_size`; a multiple of it
    makes fewer, larger MMAs, each storing one row maximum per gate block it spans). `tma`: K/V tiles by
    tensor descriptors (default: on Hopper and newer; the interpreter runs either path).
    Extra memory beside out and target: one [ceil(S/B), block_m] float32 scratch of row maxima per
    persistent program (2 per SM), O(S) in all -- independent of the number of heads and of S^2.
    """
    check_attention_inputs(q, k, v, block_size)
    batch, q_heads, seq, head_dim = q.shape
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} is not supported by the Triton attention kernels; supported: "
                         f"{SUPPORTED_HEAD_DIMS} (use_triton=never runs the PyTorch path)")
    block_m = block_m or max(block_size, 128 if q.is_cuda else 2 * block_size)   # query rows per tile
    block_n = block_n or block_size                                              # keys per tile
    if block_m % block_size or block_n % block_size:
        raise ValueError(f"block_m={block_m} and block_n={block_n} must be multiples of block_size={block_size}")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton attention kernel needs a CUDA tensor or TRITON_INTERPRET=1; "
                           "use the PyTorch path (use_triton=never) on CPU")
    scale = head_dim ** -0.5 if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    n_blocks = math.ceil(seq / block_size)
    n_m_tiles = math.ceil(seq / block_m)
    out = torch.empty_like(q)
    target = torch.zeros((batch, q_heads, n_blocks, n_blocks), device=q.device, dtype=torch.float32)
    slots = _program_slots(q.device, n_m_tiles * batch * q_heads, programs_per_sm)
    tma = use_tma(k) and use_tma(v) if tma is None else tma
    k_desc, v_desc = _kv_descriptors(k, v, block_n, tma)
    row_max = torch.empty((slots, n_blocks, block_m), device=q.device, dtype=torch.float32)
    extra = {"num_warps": num_warps or 8, "num_stages": num_stages or 3} if q.is_cuda else {}
    _kernels()[(slots,)](
        q, k, v, k_desc, v_desc, out, target, row_max, scale * 1.4426950408889634, seq, n_blocks, q_heads,
        q_heads // k.shape[1], batch * q_heads, n_m_tiles,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2), target.stride(0), target.stride(1), target.stride(2),
        row_max.stride(0), BLOCK_M=block_m, BLOCK=block_size, BLOCK_N=block_n, HEAD_DIM=head_dim, POOL=16,
        TMA=tma, **extra)
    return out, target / target.sum(-1, keepdim=True)


GLUON_HEAD_DIMS = (64, 128)
# The Gluon kernel where it applies (sm_90, 64-token blocks, head dim 64/128, half types), else the Triton kernel;
# LOWBIT_SEER_KERNEL=triton keeps the Triton kernel everywhere. The Gluon kernel takes less time than the best
# Triton tiles at S = 8k-32k on an H100 (docs/RESULTS.md, thirty-third and thirty-fourth sessions).
SEER_KERNELS = ("gluon", "triton")
SEER_KERNEL = os.environ.get("LOWBIT_SEER_KERNEL", "gluon")
if SEER_KERNEL not in SEER_KERNELS:
    raise ValueError(f"LOWBIT_SEER_KERNEL={SEER_KERNEL!r}: use one of {SEER_KERNELS} (or leave it unset: gluon "
                     f"on Hopper, triton elsewhere)")


@functools.cache
def _gluon_importable() -> bool:
    """A Triton with Gluon's Hopper API (checked once)."""
    try:
        from lowbit.kernels import attention_target_gluon  # noqa: F401
    except ImportError:
        return False
    return True


def gluon_supported(q: torch.Tensor, k: torch.Tensor, block_size: int) -> bool:
    """Whether the Hopper (Gluon) kernel takes these inputs: an sm_90 GPU, bf16/fp16, 64-token gate blocks,
    head dim 64 or 128 (rows of 128 or 256 bytes, as TMA needs), and a Triton with Gluon's Hopper API."""
    if not (q.is_cuda and cuda_facts(q.device)[0] == (9, 0)):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or block_size != 64 or q.shape[-1] not in GLUON_HEAD_DIMS:
        return False
    return _gluon_importable()


_GLUON_COMPILED: dict[tuple, object] = {}   # (kernel, device, dtype, head dim, tile_n, stages, ...) -> compiled


def attention_block_target_gluon(q, k, v, block_size: int, scale: float | None = None, stages: int = 2,
                                 tile_n: int = 128, pingpong: bool = False, programs: int = 0, head_group: int = 0,
                                 dynamic: bool = True):
    """Hopper path (lowbit.kernels.attention_target_gluon: warp-specialised, FlashAttention-3's schedule); same
    contract, scratch and numerics as attention_block_target_triton with 128-row query tiles. Persistent programs,
    one per SM (`programs`: fewer, e.g. for a test that gives each several work items); K/V tiles of `tile_n` keys
    (64 or 128), `stages` of them in flight; `pingpong`: the two consumer warpgroups issue their MMAs in turns.
    Work items go in groups of `head_group` query heads (0: as many KV heads as fit in half the L2 cache, with their
    query heads), each group's heaviest query tiles first; `dynamic`: each program takes the next untaken item
    (an atomic counter) instead of every programs-th."""
    check_attention_inputs(q, k, v, block_size)
    if tile_n not in (64, 128):
        raise ValueError(f"tile_n={tile_n}: the Gluon kernel takes K/V tiles of 64 or 128 keys")
    if not gluon_supported(q, k, block_size):
        raise ValueError(f"the Gluon attention kernel needs an sm_90 GPU, bf16/fp16, block_size=64 and head_dim in "
                         f"{GLUON_HEAD_DIMS}; got {q.device}, {q.dtype}, block_size={block_size}, "
                         f"head_dim={q.shape[-1]} (attention_block_target_triton takes the rest)")
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from lowbit.kernels.attention_target_gluon import (BLOCK_M, CONSUMER_REGS, LOADER_REGS,
                                                       attention_target_fa3_kernel, shared_layout)

    batch, q_heads, seq, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    # contiguous, and at a 16-byte aligned address for TMA (a view into a larger tensor may start anywhere)
    q, k, v = (t if t.data_ptr() % 16 == 0 else t.clone() for t in (q.contiguous(), k.contiguous(), v.contiguous()))
    n_blocks = math.ceil(seq / block_size)
    n_m_tiles = math.ceil(seq / BLOCK_M.value)
    out = torch.empty_like(q)
    # the target and, 16-byte aligned after it, the dynamic scheduler's counter: zeroed by one launch (0.0f is 0)
    size = batch * q_heads * n_blocks * n_blocks
    zeroed = torch.zeros(-(-size // 4) * 4 + 4, device=q.device, dtype=torch.float32)
    target, taken = zeroed[:size].view(batch, q_heads, n_blocks, n_blocks), zeroed[-4:-3].view(torch.int32)
    if head_group <= 0:
        kv_head_bytes = 2 * seq * head_dim * k.element_size()
        l2_bytes = cuda_facts(q.device)[2]
        head_group = max(1, l2_bytes // 2 // kv_head_bytes) * (q_heads // k.shape[1])
    head_group = min(head_group, batch * q_heads)
    slots = _program_slots(q.device, n_m_tiles * batch * q_heads, 1)
    slots = min(slots, programs) if programs > 0 else slots
    # one row more than gate blocks: a 128-key tile's second block may lie past the sequence end
    row_max = torch.empty((slots, n_blocks + 1, BLOCK_M.value), device=q.device, dtype=torch.float32)

    def descriptor(t: torch.Tensor, rows: int):
        return TensorDescriptor.from_tensor(t.view(-1, seq, head_dim), [1, rows, head_dim],
                                            shared_layout(rows, head_dim, q.dtype == torch.bfloat16))
    args = (descriptor(q, block_size), descriptor(k, tile_n), descriptor(v, tile_n), descriptor(out, block_size),
            target, row_max, taken, scale * 1.4426950408889634, seq, n_blocks, q_heads, q_heads // k.shape[1],
            batch * q_heads, n_m_tiles, head_group, target.stride(0), target.stride(1), target.stride(2),
            row_max.stride(0))
    constants = dict(STAGES=stages, PINGPONG=pingpong, DYNAMIC=dynamic, CONSUMER_REGS=CONSUMER_REGS,
                     LOADER_REGS=LOADER_REGS)
    # Launched through Triton's JIT once per kind of call, then through the compiled kernel: the JIT's argument
    # binding was the largest part of the host's ~150 us per call (its launch 35 us against the compiled kernel's
    # 16.5 even with the same descriptor objects; an H100's host, docs/RESULTS.md). Safe because nothing else
    # specialises: every pointer is a fresh, aligned allocation and every integer argument is do_not_specialize.
    kind = (attention_target_fa3_kernel, q.device.index, q.dtype, head_dim, tile_n, stages, pingpong, dynamic)
    if kind in _GLUON_COMPILED:
        _GLUON_COMPILED[kind][(slots, 1, 1)](*args, *constants.values())
    else:
        _GLUON_COMPILED[kind] = attention_target_fa3_kernel[(slots,)](*args, **constants, num_warps=4)
    return out, target / target.sum(-1, keepdim=True)


@torch.library.custom_op("lowbit::seer_attention_target", mutates_args=())
def _attention_target_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, scale: float,
                         triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if triton and SEER_KERNEL == "gluon" and gluon_supported(q, k, block_size):
        return attention_block_target_gluon(q, k, v, block_size, scale)
    if triton:
        return attention_block_target_triton(q, k, v, block_size, scale)
    return attention_block_target_torch(q, k, v, block_size, scale)


@_attention_target_op.register_fake
def _(q, k, v, block_size, scale, triton):
    n_blocks = math.ceil(q.shape[2] / block_size)
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[1], n_blocks, n_blocks), dtype=torch.float32)


def attention_with_block_target(q, k, v, block_size: int, scale: float | None = None, use_triton: str = "auto"):
    """Causal attention output and the normalised block-max-pooled attention map (see module doc).

    q [B, Hq, S, D], k/v [B, Hkv, S, D] (bf16/fp16/fp32) -> (out [B, Hq, S, D] q.dtype,
    target [B, Hq, ceil(S/B), ceil(S/B)] float32). Forward only: the base model is frozen, so the op has
    no autograd formula (torch.library custom op `lowbit::seer_attention_target`).
    """
    check_attention_inputs(q, k, v, block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with torch.no_grad():
        return _attention_target_op(q.detach(), k.detach(), v.detach(), block_size, scale,
                                    use_triton_for(q, use_triton))


def dense_causal_attention(q, k, v, scale: float | None = None):
    """SDPA causal attention with GQA expanded: the dense baseline. Shapes as above."""
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True,
                                          scale=scale)

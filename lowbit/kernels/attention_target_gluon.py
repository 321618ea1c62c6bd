"""Hopper kernel of lowbit.kernels.attention_target in Gluon (Triton's explicit-layout language): the same
one-pass causal flash attention and block-target pooling as attention_target_triton, scheduled as FlashAttention-3
schedules its forward pass (Shah et al., arXiv 2407.08608), which Triton's compiler does not do by itself:

- warp specialisation: one loader warp fills a ring of K and V tiles by TMA; two consumer warpgroups, each owning
  64 of the tile's 128 query rows, take tiles from the ring through mbarriers and never wait on each other (no
  CTA-wide barrier in the loop), so one warpgroup's softmax can run while the other's MMAs do;
- inside each warpgroup, key tile j's q k^T is issued before P_(j-1) V_(j-1) and waited for alone (a wgmma wait
  that leaves the P V groups in flight), so tile j's softmax runs while the tensor cores multiply the previous tile;
- persistent programs take work items (one 128-row query tile of one head) as FlashAttention-3's causal scheduler
  does: heads in groups whose K and V fit in half the L2 cache, each group's heaviest query tiles first, and each
  program takes the next untaken item from an atomic counter when it finishes one (the loader takes it and hands it
  to the consumers with the item's Q), so programs whose items were light take more;
- the epilogue, as FlashAttention-3's: each warpgroup writes its O rows into its half of the item's Q buffer (no
  longer read once the item's MMAs are done) and stores them by TMA, which runs while the block target is pooled.

Contract, scratch and numerics are those of the Triton kernel (fp32 accumulation, exp2 with the scale folded in,
row maxima of each gate block kept in a per-program scratch and pooled against the final log-sum-exp). Gate blocks
are 64 tokens, K/V tiles 64 or 128 keys (one or two gate blocks, each its own MMAs), query tiles 128 rows, head dim
64 or 128. Gluon has no interpreter: on CPU the kernel is compiled for sm_90 (tests/kernels/test_attention_kernels.py,
bench/attention_sass.py --gluon); its numerics are checked on a GPU against the Triton kernel and the PyTorch path.
"""
import functools

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

from lowbit.kernels import sass as machine_code

HALF_M = gl.constexpr(64)       # query rows per consumer warpgroup (one gate block)
BLOCK_M = gl.constexpr(128)     # query rows per program tile (two warpgroups)
BLOCK_N = gl.constexpr(64)      # keys per gate block; K/V tiles hold one or two (64 or 128 keys)
POOL = gl.constexpr(16)         # key blocks per step of the pooling epilogue
CONSUMER_REGS = 240             # registers per thread of the second consumer warpgroup (setmaxnreg; the first, the
LOADER_REGS = 24                # default partition, takes 256): 2 x 128 x 256-or-240 + 32 x 24 <= 64K per SM
# Gluon's API between Triton 3.6 (the GPU image) and 3.7+ (the CPU build here): a barrier among one partition's
# warps, and the TMA load into and store from shared memory
_partition_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global


@functools.cache
def shared_layout(rows: int, head_dim: int, bf16: bool) -> gl.NVMMASharedLayout:
    """The shared-memory layout of a [1, rows, head_dim] TMA tile (made once: building it costs host time)."""
    return gl.NVMMASharedLayout.get_default_for([1, rows, head_dim], gl.bfloat16 if bf16 else gl.float16)


@gluon.jit
def _work_item(work, batch_heads, q_heads, n_m_tiles, head_group, BLOCK_M: gl.constexpr):
    """(first query row, batch, head) of work item `work`: heads in groups of `head_group` (sized by the host so that
    their K and V fit in half the L2 cache: the programs running at once read the same K/V tiles), heaviest (last)
    query tiles first within a group (the longest-processing-time order of FlashAttention-3's causal scheduler)."""
    group = work // (head_group * n_m_tiles)
    heads = gl.minimum(head_group, batch_heads - group * head_group)      # the last group may be smaller
    rest = work - group * head_group * n_m_tiles
    m_tile = n_m_tiles - 1 - rest // heads
    bh = group * head_group + rest % heads
    return m_tile * BLOCK_M, bh // q_heads, bh % q_heads


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
            work_smem, Counter, seq, q_heads, groups, batch_heads, n_m_tiles, head_group, DYNAMIC: gl.constexpr):
    """One warp: picks each work item (DYNAMIC: the next untaken one, by an atomic counter, so a program that
    finishes early takes more; else every num_programs-th), hands its (first row, batch, head, batch x heads + head)
    to the consumers with its Q (both halves, double-buffered so that the next item's loads start while the
    consumers finish this one), then loads its K and V tiles into the ring, each slot once both consumers released
    it. A negative first row, with no Q, ends the consumers' loops."""
    STAGES: gl.constexpr = k_smem.shape[0]
    TILE_N: gl.constexpr = k_smem.shape[2]
    fields = gl.arange(0, 4, layout=gl.BlockedLayout([1], [32], [1], [0]))
    total = n_m_tiles * batch_heads
    counter = 0
    item = 0
    work = gl.program_id(0)
    while work < total:
        m0, b, h = _work_item(work, batch_heads, q_heads, n_m_tiles, head_group, BLOCK_M)
        kv_row = b * (q_heads // groups) + h // groups
        q_slot = item % 2
        mbarrier.wait(q_empty.index(q_slot), ((item // 2) & 1) ^ 1)
        work_smem.index(q_slot).store(gl.where(fields == 0, m0, gl.where(fields == 1, b, gl.where(
            fields == 2, h, b * q_heads + h))))
        mbarrier.expect(q_ready.index(q_slot), 2 * q_desc.block_type.nbytes)
        _tma_load(q_desc, [b * q_heads + h, m0, 0], q_ready.index(q_slot), q_smem.index(2 * q_slot))
        _tma_load(q_desc, [b * q_heads + h, m0 + HALF_M, 0], q_ready.index(q_slot), q_smem.index(2 * q_slot + 1))
        if DYNAMIC:
            work = gl.num_programs(0) + _warp_uniform(gl.atomic_add(Counter, 1))  # used after this item's K/V
        else:
            work += gl.num_programs(0)
        n_tiles = gl.cdiv(gl.minimum(m0 + BLOCK_M, seq), TILE_N)
        for j in range(n_tiles):
            slot = counter % STAGES
            phase = (counter // STAGES) & 1
            mbarrier.wait(k_empty.index(slot), phase ^ 1)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            _tma_load(k_desc, [kv_row, j * TILE_N, 0], k_ready.index(slot), k_smem.index(slot))
            mbarrier.wait(v_empty.index(slot), phase ^ 1)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            _tma_load(v_desc, [kv_row, j * TILE_N, 0], v_ready.index(slot), v_smem.index(slot))
            counter += 1
        item += 1
    q_slot = item % 2
    mbarrier.wait(q_empty.index(q_slot), ((item // 2) & 1) ^ 1)
    work_smem.index(q_slot).store(gl.full([4], -1, gl.int32, fields.type.layout))
    mbarrier.arrive(q_ready.index(q_slot))


@gluon.jit
def _loader_dynamic(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
                    v_empty, work_smem, Counter, seq, q_heads, groups, batch_heads, n_m_tiles, head_group):
    _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
            work_smem, Counter, seq, q_heads, groups, batch_heads, n_m_tiles, head_group, True)


@gluon.jit
def _loader_static(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
                   v_empty, work_smem, Counter, seq, q_heads, groups, batch_heads, n_m_tiles, head_group):
    _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
            work_smem, Counter, seq, q_heads, groups, batch_heads, n_m_tiles, head_group, False)


@gluon.jit
def _handed(work_smem, slot, FIELD: gl.constexpr):
    """Field FIELD (0: first query row, negative when no items are left; 1: batch; 2: head; 3: batch x query heads
    + head, the row of Q and O viewed as [batch x heads, seq, head_dim]) of the work item the loader put in Q slot
    `slot`. Read where needed, so that they take no registers in the key-tile loop."""
    fields = gl.arange(0, 4, layout=gl.BlockedLayout([1], [32], [4], [0]))
    return _warp_uniform(gl.sum(gl.where(fields == FIELD, work_smem.index(slot).load(fields.type.layout), 0), 0))


@gluon.jit
def _warp_uniform(value):
    """`value` (the same in every thread) broadcast from lane 0: without it ptxas cannot tell that a value read from
    memory is uniform, and every K/V ring address derived from it (through the tile counts) moves from uniform to
    per-thread registers: under Triton 3.6, 80 R2UR more per key tile and the kernel up to 15% slower (H100)."""
    return gl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, 0, 0x1f, -1;", "=r,r", [value], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _masked(s, rows, cols, seq):
    """Scores of keys after the query row or past the sequence end -> -inf."""
    keep = (gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1)) & gl.expand_dims(cols < seq, 0)
    return gl.where(keep, s, float("-inf"))


@gluon.jit
def _tile_scores(q, k_smem, slot, zeros_s, SUB: gl.constexpr):
    """Issues q k^T for 64-key sub-block SUB of the K tile in `slot` (asynchronous: a wgmma group)."""
    TILE_N: gl.constexpr = k_smem.shape[2]
    HEAD_DIM: gl.constexpr = k_smem.shape[3]
    k = k_smem.index(slot).reshape([TILE_N, HEAD_DIM]).slice(SUB * BLOCK_N, BLOCK_N, dim=0).permute((1, 0))
    return warpgroup_mma(q, k, zeros_s, use_acc=False, is_async=True)


@gluon.jit
def _tile_pv(p_op, v_smem, slot, acc, SUB: gl.constexpr):
    """Issues acc += P V for 64-key sub-block SUB of the V tile in `slot` (asynchronous)."""
    TILE_N: gl.constexpr = v_smem.shape[2]
    HEAD_DIM: gl.constexpr = v_smem.shape[3]
    v = v_smem.index(slot).reshape([TILE_N, HEAD_DIM]).slice(SUB * BLOCK_N, BLOCK_N, dim=0)
    return warpgroup_mma(p_op, v, acc, is_async=True)


@gluon.jit
def _await_turn(turn, turns, HALF: gl.constexpr):
    """Ping-pong (`turn` holds two barriers): wait until the other warpgroup has issued its MMAs of the step before.
    `turns`: this warpgroup's MMA-issuing steps so far (one per key tile plus one per work item: tiles consumed +
    items done, no counter of its own)."""
    if turn.shape[0] == 2:
        mbarrier.wait(turn.index(HALF), (turns & 1) ^ (1 - HALF))     # warpgroup 0 goes first


@gluon.jit
def _pass_turn(turn, HALF: gl.constexpr):
    """Ping-pong: my MMAs are issued; the other warpgroup may issue its own (while I run my softmax)."""
    if turn.shape[0] == 2:
        mbarrier.arrive(turn.index(1 - HALF))


@gluon.jit
def _block_softmax(s, rows, cols, seq, row_max_ptr, scale_log2, MASKED):
    """One 64-key block's scores -> (scores, masked; the block's row maxima in log2 units, stored to the scratch)."""
    if MASKED:
        s = _masked(s, rows, cols, seq)
    block_max = gl.max(s, 1) * scale_log2
    gl.store(row_max_ptr, block_max)
    return s, block_max


@gluon.jit
def _consumer(HALF: gl.constexpr, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
              work_smem, turn, o_desc, Target, RowMax, scale_log2, seq, n_blocks, st_b, st_h, st_q, sr_slot):
    """One warpgroup: query rows [HALF * 64, HALF * 64 + 64) of each work item's tile, K/V tiles of TILE_N = 64 or
    128 keys (one or two gate blocks, each its own q k^T and P V MMAs: one row maximum per gate block)."""
    STAGES: gl.constexpr = k_smem.shape[0]
    TILE_N: gl.constexpr = k_smem.shape[2]
    HEAD_DIM: gl.constexpr = k_smem.shape[3]
    SPLIT: gl.constexpr = TILE_N // BLOCK_N
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    pool_layout: gl.constexpr = gl.BlockedLayout([1, 2], [1, 32], [4, 1], [1, 0])
    offs_r = gl.arange(0, HALF_M, layout=gl.SliceLayout(1, s_layout))
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    offs_ro = gl.arange(0, HALF_M, layout=gl.SliceLayout(1, o_layout))
    pool_kb = gl.arange(0, POOL, layout=gl.SliceLayout(1, pool_layout))
    pool_r = gl.arange(0, HALF_M, layout=gl.SliceLayout(0, pool_layout))
    scratch = RowMax + gl.program_id(0) * sr_slot + HALF * HALF_M      # this half's columns of the row-max scratch
    row_max_base = scratch + offs_r
    zeros_s = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
    counter = 0
    item = 0
    mbarrier.wait(q_ready.index(0), 0)
    m0 = _handed(work_smem, 0, 0)
    while m0 >= 0:
        rows = m0 + HALF * HALF_M + offs_r
        n_tiles = gl.cdiv(gl.minimum(m0 + BLOCK_M, seq), TILE_N)
        full_tiles = m0 // TILE_N                       # key tiles left of the diagonal: no mask
        q_slot = item % 2
        q = q_smem.index(2 * q_slot + HALF).reshape([HALF_M, HEAD_DIM])

        # key tile 0 (masked: right for every tile), no P V yet
        slot = counter % STAGES
        phase = (counter // STAGES) & 1
        mbarrier.wait(k_ready.index(slot), phase)
        _await_turn(turn, counter + item, HALF)
        s = _tile_scores(q, k_smem, slot, zeros_s, 0)
        if SPLIT == 2:
            s_b = _tile_scores(q, k_smem, slot, zeros_s, 1)
        _pass_turn(turn, HALF)
        if SPLIT == 2:
            s, s_b = warpgroup_mma_wait(0, deps=[s, s_b])
        else:
            s = warpgroup_mma_wait(0, deps=[s])
        mbarrier.arrive(k_empty.index(slot))
        s, m_i = _block_softmax(s, rows, offs_n, seq, row_max_base, scale_log2, True)
        if SPLIT == 2:
            s_b, max_b = _block_softmax(s_b, rows, BLOCK_N + offs_n, seq, row_max_base + BLOCK_M, scale_log2, True)
            m_i = gl.maximum(m_i, max_b)
        p = gl.exp2(s * scale_log2 - gl.expand_dims(m_i, 1))
        l_i = gl.sum(p, 1)
        p_op = gl.convert_layout(p.to(v_smem.dtype), p_layout)
        p_op_b = p_op
        if SPLIT == 2:
            p_b = gl.exp2(s_b * scale_log2 - gl.expand_dims(m_i, 1))
            l_i += gl.sum(p_b, 1)
            p_op_b = gl.convert_layout(p_b.to(v_smem.dtype), p_layout)
        acc = gl.zeros([HALF_M, HEAD_DIM], gl.float32, o_layout)
        prev_slot = slot
        prev_phase = phase
        counter += 1
        for j in range(1, n_tiles):
            slot = counter % STAGES
            phase = (counter // STAGES) & 1
            mbarrier.wait(k_ready.index(slot), phase)
            _await_turn(turn, counter + item, HALF)
            s = _tile_scores(q, k_smem, slot, zeros_s, 0)                         # S_j
            if SPLIT == 2:
                s_b = _tile_scores(q, k_smem, slot, zeros_s, 1)
            mbarrier.wait(v_ready.index(prev_slot), prev_phase)
            acc = _tile_pv(p_op, v_smem, prev_slot, acc, 0)                       # O += P_(j-1) V_(j-1)
            if SPLIT == 2:
                acc = _tile_pv(p_op_b, v_smem, prev_slot, acc, 1)
            _pass_turn(turn, HALF)
            if SPLIT == 2:
                s, s_b = warpgroup_mma_wait(2, deps=[s, s_b])                     # S_j alone
            else:
                s = warpgroup_mma_wait(1, deps=[s])
            mbarrier.arrive(k_empty.index(slot))
            masked = j >= full_tiles
            s, tile_max = _block_softmax(s, rows, j * TILE_N + offs_n, seq,
                                         row_max_base + j * SPLIT * BLOCK_M, scale_log2, masked)
            if SPLIT == 2:
                s_b, max_b = _block_softmax(s_b, rows, j * TILE_N + BLOCK_N + offs_n, seq,
                                            row_max_base + (j * SPLIT + 1) * BLOCK_M, scale_log2, masked)
                tile_max = gl.maximum(tile_max, max_b)
            m_new = gl.maximum(m_i, tile_max)
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s * scale_log2 - gl.expand_dims(m_new, 1))
            l_i = l_i * alpha + gl.sum(p, 1)
            if SPLIT == 2:
                p_b = gl.exp2(s_b * scale_log2 - gl.expand_dims(m_new, 1))
                l_i += gl.sum(p_b, 1)
            m_i = m_new
            acc, p_op, p_op_b = warpgroup_mma_wait(0, deps=[acc, p_op, p_op_b])
            mbarrier.arrive(v_empty.index(prev_slot))
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            p_op = gl.convert_layout(p.to(v_smem.dtype), p_layout)
            if SPLIT == 2:
                p_op_b = gl.convert_layout(p_b.to(v_smem.dtype), p_layout)
            prev_slot = slot
            prev_phase = phase
            counter += 1
        mbarrier.wait(v_ready.index(prev_slot), prev_phase)
        _await_turn(turn, counter + item, HALF)
        acc = _tile_pv(p_op, v_smem, prev_slot, acc, 0)
        if SPLIT == 2:
            acc = _tile_pv(p_op_b, v_smem, prev_slot, acc, 1)
        _pass_turn(turn, HALF)
        acc, p_op, p_op_b = warpgroup_mma_wait(0, deps=[acc, p_op, p_op_b])
        mbarrier.arrive(v_empty.index(prev_slot))
        b = _handed(work_smem, q_slot, 1)
        h = _handed(work_smem, q_slot, 2)

        # O into this half's Q buffer (this item's MMAs are done: Q is read no more), then to global memory by one
        # TMA store (rows past the sequence end clipped) that runs while the block target is pooled
        rows_o = m0 + HALF * HALF_M + offs_ro
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        l_o = gl.where(rows_o < seq, l_o, 1.0)
        o_smem = q_smem.index(2 * q_slot + HALF)
        o_smem.reshape([HALF_M, HEAD_DIM]).store((acc / gl.expand_dims(l_o, 1)).to(o_smem.dtype))
        fence_async_shared()

        # Pool: target[query block, key block] = max over the block's rows of exp2(row max - lse)
        l_safe = gl.where(rows < seq, l_i, 1.0)
        lse = gl.where(rows < seq, m_i + gl.log2(l_safe), float("inf"))      # padded rows pool exp2(-inf) = 0
        lse = gl.convert_layout(lse, gl.SliceLayout(0, pool_layout))
        _partition_barrier()             # O is in shared memory, the scratch rows are visible to all threads
        _tma_store(o_desc, [_handed(work_smem, q_slot, 3), m0 + HALF * HALF_M, 0], o_smem)
        key_blocks = gl.cdiv(gl.minimum(m0 + BLOCK_M, seq), BLOCK_N)
        q_block = (m0 + HALF * HALF_M) // HALF_M
        t_base = Target + b * st_b + h * st_h + q_block * st_q
        for kb0 in range(0, key_blocks, POOL):
            kbs = kb0 + pool_kb
            written = kbs < key_blocks
            row_max = gl.load(scratch + gl.expand_dims(kbs, 1) * BLOCK_M + gl.expand_dims(pool_r, 0),
                              mask=gl.expand_dims(written, 1), other=float("-inf"))
            pooled = gl.max(gl.exp2(row_max - gl.expand_dims(lse, 0)), 1)
            gl.store(t_base + kbs, pooled, mask=written & (q_block < n_blocks))
        tma.store_wait(0)                # O has left the Q buffer
        _partition_barrier()             # ... and all reads of the scratch are done before the next item rewrites it
        mbarrier.arrive(q_empty.index(q_slot))      # the loader may now overwrite the slot's Q and work item
        item += 1
        mbarrier.wait(q_ready.index(item % 2), (item // 2) & 1)
        m0 = _handed(work_smem, item % 2, 0)


@gluon.jit
def _consumer_low(q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, work_smem, turn,
                  o_desc, Target, RowMax, scale_log2, seq, n_blocks, st_b, st_h, st_q, sr_slot):
    _consumer(0, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, work_smem, turn,
              o_desc, Target, RowMax, scale_log2, seq, n_blocks, st_b, st_h, st_q, sr_slot)


@gluon.jit
def _consumer_high(q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, work_smem, turn,
                   o_desc, Target, RowMax, scale_log2, seq, n_blocks, st_b, st_h, st_q, sr_slot):
    _consumer(1, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, work_smem, turn,
              o_desc, Target, RowMax, scale_log2, seq, n_blocks, st_b, st_h, st_q, sr_slot)


# do_not_specialize: an integer argument equal to 1 would be a constant, which warp-specialised partitions cannot take
@gluon.jit(do_not_specialize=["scale_log2", "seq", "n_blocks", "q_heads", "groups", "batch_heads", "n_m_tiles",
                               "head_group", "st_b", "st_h", "st_q", "sr_slot"])
def attention_target_fa3_kernel(q_desc, k_desc, v_desc, o_desc, Target, RowMax, Counter, scale_log2, seq, n_blocks,
                                q_heads, groups, batch_heads, n_m_tiles, head_group, st_b, st_h, st_q, sr_slot,
                                STAGES: gl.constexpr, PINGPONG: gl.constexpr, DYNAMIC: gl.constexpr,
                                CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [4] + q_desc.block_type.shape, q_desc.layout)  # 2 items x 2 halves
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    # PINGPONG: the consumers issue their MMAs in turns, each while the other runs its softmax (FlashAttention-3's
    # inter-warpgroup schedule); the partitions read the switch from the number of turn barriers (2, or 1 unused)
    turn = gl.allocate_shared_memory(gl.int64, [2 if PINGPONG else 1, 1], mbarrier.MBarrierLayout())
    if PINGPONG:
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)    # both consumer warpgroups release Q
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2)
    # (first query row, batch, head, batch x heads + head) of the work item whose Q is in each Q slot: loader ->
    # consumers, by q_ready
    work_smem = gl.allocate_shared_memory(gl.int32, [2, 4], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    barriers = (q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, work_smem)
    consumer_args = barriers + (turn, o_desc, Target, RowMax, scale_log2, seq, n_blocks, st_b, st_h, st_q, sr_slot)
    loader_args = (q_desc, k_desc, v_desc) + barriers + (Counter, seq, q_heads, groups, batch_heads, n_m_tiles,
                                                         head_group)
    gl.warp_specialize([(_consumer_low, consumer_args), (_consumer_high, consumer_args),
                        (_loader_dynamic if DYNAMIC else _loader_static, loader_args)],
                       [4, 1], [CONSUMER_REGS, LOADER_REGS])


def hopper_binary(head_dim: int = 128, stages: int = 2, dtype: str = "bf16", tile_n: int = 64,
                  consumer_regs: int = CONSUMER_REGS, pingpong: bool = False, dynamic: bool = True) -> dict:
    """The kernel compiled for sm_90 without a GPU: machine_code.dump's {"sass", "registers", "spill_bytes",
    "shared_bytes"}. For the CPU test and bench/attention_sass.py."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    element = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    def desc_type(rows: int) -> str:
        return mangle_type(TensorDescriptor.from_tensor(torch.empty(1, 128, head_dim, dtype=element),
                                                        [1, rows, head_dim], shared_layout(rows, head_dim,
                                                                                          dtype == "bf16")))
    names = attention_target_fa3_kernel.arg_names
    signature = {name: "i32" for name in names}
    signature.update(q_desc=desc_type(int(HALF_M)), k_desc=desc_type(tile_n), v_desc=desc_type(tile_n),
                     o_desc=desc_type(int(HALF_M)), Target="*fp32", RowMax="*fp32", Counter="*i32", scale_log2="fp32")
    constants = dict(STAGES=stages, PINGPONG=pingpong, DYNAMIC=dynamic, CONSUMER_REGS=consumer_regs,
                     LOADER_REGS=LOADER_REGS)
    signature.update({name: "constexpr" for name in constants})
    source = GluonASTSource(fn=attention_target_fa3_kernel, signature=signature,
                            constexprs={(names.index(name),): value for name, value in constants.items()})
    return machine_code.dump(triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)))


def key_tile_loops(sass: str) -> list[dict[str, int]]:
    """Each consumer's key-tile loop in `sass` (an innermost loop around P V's register-operand HGMMA): how many of
    each opcode it holds (masked and unmasked branches both counted)."""
    import re

    return [machine_code.opcodes(loop["body"]) for loop in machine_code.loops(sass) if loop["innermost"]
            and any(re.match(r"HGMMA\.\S+ R\d+, R\d+, gdesc", text) for text in loop["body"])]

"""Triton kernel of lowbit.kernels.attention_target: one-pass causal flash attention that also pools
SeerAttention's block target (the algorithm and the contract are in that module's docstring).

Imported on first use, so that TRITON_INTERPRET (read when a kernel is decorated) can be set first.
"""
import triton
import triton.language as tl


@triton.jit
def _load_kv(base, desc, kv_row, start, cols, offs_d, seq, sk_s, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             TMA: tl.constexpr):
    """One [BLOCK_N, HEAD_DIM] tile of K or V: by the tensor-memory accelerator (a descriptor over
    [batch x kv_heads, seq, head_dim], rows past `seq` read as 0) or by pointers (masked)."""
    if TMA:
        return desc.load([kv_row, start, 0]).reshape(BLOCK_N, HEAD_DIM)
    return tl.load(base + cols[:, None] * sk_s + offs_d[None, :], mask=(cols < seq)[:, None], other=0.0)


@triton.jit
def _flash_step(q, acc, m_i, l_i, k_base, v_base, k_desc, v_desc, kv_row, row_max_ptr, kt, offs_m, offs_r, offs_n,
                offs_d, seq, n_blocks, sk_s, scale_log2, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):
    """One key tile (BLOCK_N keys = BLOCK_N / BLOCK gate blocks) of the online softmax (Dao et al.); also
    stores each gate block's per-row score maximum (log2 units)."""
    cols = kt * BLOCK_N + offs_n
    k = _load_kv(k_base, k_desc, kv_row, kt * BLOCK_N, cols, offs_d, seq, sk_s, BLOCK_N, HEAD_DIM, TMA)
    qk = tl.dot(q, tl.trans(k))                                   # raw scores; scale_log2 > 0 commutes with max
    if MASKED:      # the diagonal tiles: causal mask and the sequence end
        qk = tl.where((cols[None, :] <= offs_m[:, None]) & (cols < seq)[None, :], qk, float("-inf"))
    if BLOCK_N == BLOCK:
        tile_max = tl.max(qk, 1) * scale_log2
        tl.store(row_max_ptr + kt * BLOCK_M + offs_r, tile_max)
    else:           # several gate blocks per key tile: one maximum per (row, gate block)
        GATE_BLOCKS: tl.constexpr = BLOCK_N // BLOCK
        block_max = tl.max(tl.reshape(qk, (BLOCK_M, GATE_BLOCKS, BLOCK)), 2) * scale_log2   # [BLOCK_M, GATE_BLOCKS]
        tile_max = tl.max(block_max, 1)
        blocks = kt * GATE_BLOCKS + tl.arange(0, GATE_BLOCKS)
        tl.store(row_max_ptr + blocks[None, :] * BLOCK_M + offs_r[:, None], block_max,
                 mask=(blocks < n_blocks)[None, :])
    m_new = tl.maximum(m_i, tile_max)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * scale_log2 - m_new[:, None])                 # one FMA per score
    v = _load_kv(v_base, v_desc, kv_row, kt * BLOCK_N, cols, offs_d, seq, sk_s, BLOCK_N, HEAD_DIM, TMA)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])          # accumulate in the MMA
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def attention_target_kernel(Q, K, V, K_desc, V_desc, Out, Target, RowMax, scale_log2, seq, n_blocks, q_heads, groups,
                            batch_heads, n_m_tiles,
                            sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, so_b, so_h, so_s, st_b, st_h, st_q, sr_slot,
                            BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                            HEAD_DIM: tl.constexpr, POOL: tl.constexpr, TMA: tl.constexpr):
    slot = tl.program_id(0)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_M)
    row_max_base = RowMax + slot * sr_slot          # this program's [n_blocks, BLOCK_M] scratch
    # Persistent loop: work items (query tile, batch x head), heaviest (last) query tiles first.
    for work in range(slot, n_m_tiles * batch_heads, tl.num_programs(0)):
        m_tile = n_m_tiles - 1 - work // batch_heads
        bh = work % batch_heads
        b = bh // q_heads
        h = bh % q_heads
        kv_h = h // groups
        m0 = m_tile * BLOCK_M
        offs_m = m0 + offs_r
        row_ok = offs_m < seq
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        k_base = K + b * sk_b + kv_h * sk_h
        v_base = V + b * sk_b + kv_h * sk_h
        kv_row = b * (q_heads // groups) + kv_h        # this head's plane of the [batch x kv_heads, seq, d] view
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        # One pass of flash-attention forward (online softmax) over the causal key blocks. Each tile also
        # stores its per-row score maximum: after the loop, exp2(row max - lse) is the row's largest
        # final probability in that key block, so the target needs no second q k^T pass.
        full_tiles = m0 // BLOCK_N                    # key tiles left of the diagonal: no mask
        key_end = tl.minimum(m0 + BLOCK_M, seq)
        for kt in range(0, full_tiles):
            acc, m_i, l_i = _flash_step(q, acc, m_i, l_i, k_base, v_base, K_desc, V_desc, kv_row, row_max_base, kt,
                                        offs_m, offs_r, offs_n, offs_d, seq, n_blocks, sk_s, scale_log2, BLOCK_M,
                                        BLOCK, BLOCK_N, HEAD_DIM, False, TMA)
        for kt in range(full_tiles, tl.cdiv(key_end, BLOCK_N)):
            acc, m_i, l_i = _flash_step(q, acc, m_i, l_i, k_base, v_base, K_desc, V_desc, kv_row, row_max_base, kt,
                                        offs_m, offs_r, offs_n, offs_d, seq, n_blocks, sk_s, scale_log2, BLOCK_M,
                                        BLOCK, BLOCK_N, HEAD_DIM, True, TMA)
        key_blocks = tl.cdiv(key_end, BLOCK)          # gate blocks with a stored row maximum
        l_safe = tl.where(row_ok, l_i, 1.0)
        tl.store(Out + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :],
                 (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None])
        lse = tl.where(row_ok, m_i + tl.log2(l_safe), float("inf"))   # padded rows pool exp2(-inf) = 0
        # Pool: target[query block, key block] = max over the block's rows of exp2(row max - lse).
        tl.debug_barrier()      # the scratch rows written by every thread of the program are visible
        q_block0 = m0 // BLOCK
        t_base = Target + b * st_b + h * st_h
        for kb0 in range(0, key_blocks, POOL):
            kbs = kb0 + tl.arange(0, POOL)
            written = kbs < key_blocks
            row_max = tl.load(row_max_base + kbs[:, None] * BLOCK_M + offs_r[None, :], mask=written[:, None],
                              other=float("-inf"))
            p = tl.exp2(row_max - lse[None, :])                                   # [POOL, BLOCK_M]
            pooled = tl.max(tl.reshape(p, (POOL, BLOCK_M // BLOCK, BLOCK)), 2)   # [POOL, query blocks]
            q_blocks = q_block0 + tl.arange(0, BLOCK_M // BLOCK)
            tl.store(t_base + q_blocks[None, :] * st_q + kbs[:, None], pooled,
                     mask=written[:, None] & (q_blocks < n_blocks)[None, :])
        tl.debug_barrier()      # all reads of the scratch are done before the next work item rewrites it

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
def _store_in_place(ptrs, values, ASM: tl.constexpr):
    """Store a float32 tensor from the layout it is in; returns `values`. tl.store would first move a row vector
    of the MMA's layout into a coalesced one through shared memory, between CTA-wide barriers, once per key tile;
    st.global by inline PTX keeps each value in the thread that holds it (the threads of a quad share a row and
    store it alike). The asm is declared pure, so that Triton puts no barrier before it, and its result (0) is
    added to `values` so that it is kept. ASM=False (the interpreter) is tl.store."""
    if ASM:
        zero = tl.inline_asm_elementwise("st.global.f32 [$1], $2;\n\tmov.b32 $0, 0;", "=f,l,f", [ptrs.to(tl.int64), values],
                                         dtype=tl.float32, is_pure=True, pack=1)
        return values + zero
    else:
        tl.store(ptrs, values)
        return values


@triton.jit
def _exp2_fma(x):
    """2^x for x <= 0 on the FMA and integer pipes instead of the MUFU (FlashAttention-4's trick): round x to an
    integer j by adding 1.5 * 2^23 (j lands in the sum's low mantissa bits), a cubic in f = x - j in [-1/2, 1/2]
    (relative error 7.7e-5, below bf16's 2^-9 rounding of P), then j added to the exponent field. x is clamped at
    -126, so a masked score gives 2^-126 in place of 0: nothing next to a row sum >= 1."""
    x = tl.maximum(x, -126.0)
    t = x + 12582912.0
    f = x - (t - 12582912.0)
    p = ((0.05508868 * f + 0.24260405) * f + 0.69327624) * f + 0.99992894
    bits = p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _exp2(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXP_FMA: tl.constexpr):
    """exp2 of a score tile: all on the MUFU (EXP_FMA=0), every other column by `_exp2_fma` (1), or all of it (2)."""
    if EXP_FMA == 0:
        return tl.exp2(x)
    elif EXP_FMA == 1:
        a, b = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_N // 2, 2)))
        return tl.reshape(tl.join(tl.exp2(a), _exp2_fma(b)), (BLOCK_M, BLOCK_N))
    else:
        return _exp2_fma(x)


@triton.jit
def _flash_step(q, acc, m_i, l_i, k_base, v_base, k_desc, v_desc, kv_row, row_max_ptr, kt, offs_m, offs_r, offs_n,
                offs_d, seq, n_blocks, sk_s, scale_log2, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
                EXP_FMA: tl.constexpr, ASM_STORE: tl.constexpr):
    """One key tile (BLOCK_N keys = BLOCK_N / BLOCK gate blocks) of the online softmax (Dao et al.); also
    stores each gate block's per-row score maximum (log2 units)."""
    cols = kt * BLOCK_N + offs_n
    k = _load_kv(k_base, k_desc, kv_row, kt * BLOCK_N, cols, offs_d, seq, sk_s, BLOCK_N, HEAD_DIM, TMA)
    qk = tl.dot(q, tl.trans(k))                                   # raw scores; scale_log2 > 0 commutes with max
    if MASKED:      # the diagonal tiles: causal mask and the sequence end
        qk = tl.where((cols[None, :] <= offs_m[:, None]) & (cols < seq)[None, :], qk, float("-inf"))
    if BLOCK_N == BLOCK:
        tile_max = tl.max(qk, 1) * scale_log2
        tile_max = _store_in_place(row_max_ptr + kt * BLOCK_M + offs_r, tile_max, ASM_STORE)
    else:           # several gate blocks per key tile: one maximum per (row, gate block)
        GATE_BLOCKS: tl.constexpr = BLOCK_N // BLOCK
        block_max = tl.max(tl.reshape(qk, (BLOCK_M, GATE_BLOCKS, BLOCK)), 2) * scale_log2   # [BLOCK_M, GATE_BLOCKS]
        tile_max = tl.max(block_max, 1)
        blocks = kt * GATE_BLOCKS + tl.arange(0, GATE_BLOCKS)
        tl.store(row_max_ptr + blocks[None, :] * BLOCK_M + offs_r[:, None], block_max,
                 mask=(blocks < n_blocks)[None, :])
    m_new = tl.maximum(m_i, tile_max)
    alpha = tl.exp2(m_i - m_new)
    p = _exp2(qk * scale_log2 - m_new[:, None], BLOCK_M, BLOCK_N, EXP_FMA)   # one FMA per score
    v = _load_kv(v_base, v_desc, kv_row, kt * BLOCK_N, cols, offs_d, seq, sk_s, BLOCK_N, HEAD_DIM, TMA)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])          # accumulate in the MMA
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def attention_target_kernel(Q, K, V, K_desc, V_desc, Out, Target, RowMax, scale_log2, seq, n_blocks, q_heads, groups,
                            batch_heads, n_m_tiles,
                            sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, so_b, so_h, so_s, st_b, st_h, st_q, sr_slot,
                            BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                            HEAD_DIM: tl.constexpr, POOL: tl.constexpr, TMA: tl.constexpr,
                            EXP_FMA: tl.constexpr = 0, ASM_STORE: tl.constexpr = False,
                            Q_REGS: tl.constexpr = False):
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
        if Q_REGS:      # an op on q (x + 0 is not folded: -0 + 0 = +0) makes q k^T take q from registers
            q = q + 0.0
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
                                        BLOCK, BLOCK_N, HEAD_DIM, False, TMA, EXP_FMA, ASM_STORE)
        for kt in range(full_tiles, tl.cdiv(key_end, BLOCK_N)):
            acc, m_i, l_i = _flash_step(q, acc, m_i, l_i, k_base, v_base, K_desc, V_desc, kv_row, row_max_base, kt,
                                        offs_m, offs_r, offs_n, offs_d, seq, n_blocks, sk_s, scale_log2, BLOCK_M,
                                        BLOCK, BLOCK_N, HEAD_DIM, True, TMA, EXP_FMA, ASM_STORE)
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

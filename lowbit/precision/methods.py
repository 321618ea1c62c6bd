"""Training methods around the quantizer: DGE, OCC (arXiv 2501.17116) and the random Hadamard transform."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lowbit.kernels import use_triton_for
from lowbit.kernels.occ_clamp import occ_clamp_triton
from lowbit.kernels.segment_matmul import segment_matmul_add_
from lowbit.precision.formats import FloatFormat, grid_spacing


def dge_derivative(scaled: torch.Tensor, fmt: FloatFormat, k: float, clip: float) -> torch.Tensor:
    """Differentiable Gradient Estimator, arXiv 2501.17116 eq. 8 (derivative of eq. 7).

    Inside each quantization interval [lo, lo + delta] of `fmt` the step function is replaced by
    f(x) = delta/2 * (1 + sign(2t - 1) |2t - 1|^(1/k)), t = (x - lo)/delta, whose derivative is
    f'(x) = (1/k) |2t - 1|^(1/k - 1): steep mid-interval, flat near grid points. Clipped at `clip`
    (the derivative is unbounded at the interval centre). scaled: float32 W / scale [...] -> same shape.
    """
    magnitude = scaled.float().abs().clamp(max=fmt.max)
    ulp = grid_spacing(magnitude, fmt)
    position = magnitude / ulp - torch.floor(magnitude / ulp)          # t in [0, 1): place inside the interval
    derivative = (1.0 / k) * (2.0 * position - 1.0).abs().pow(1.0 / k - 1.0)
    return derivative.clamp(max=clip)


OUTLIER_SAMPLE = 1 << 20      # |x| values the OCC quantile is estimated from (exact below this size)


def outlier_count(quantile: float, n: int) -> int:
    """How many of n values lie above the `quantile`: ceil((1 - quantile) n), at least 1, with (1 - 0.97) * 200 = 6
    and not 7 (the float64 product is 6.000000000000005)."""
    return max(1, math.ceil(round((1.0 - quantile) * n, 9)))


def outlier_threshold(x: torch.Tensor, quantile: float, group=None) -> torch.Tensor:
    """The `quantile` of |x| over the tensor (fp32 0-d). Above OUTLIER_SAMPLE elements it is estimated
    on a strided sample whose stride is coprime to the row length, so every channel is sampled evenly
    (a full top-k over a 30M-element activation would cost more than the GEMM it protects).

    group: x is one tensor-parallel shard (columns) of the tensor whose quantile is wanted. The global
    top `count` values lie among the union of every shard's own top `count`, so gathering those gives the
    exact quantile of the whole tensor (of the union of the shards' samples above OUTLIER_SAMPLE).
    """
    flat = x.detach().reshape(-1)
    if flat.numel() > OUTLIER_SAMPLE:
        stride = flat.numel() // OUTLIER_SAMPLE
        while math.gcd(stride, x.shape[-1]) != 1:
            stride += 1
        flat = flat[::stride]
    magnitude = flat.abs().float()
    shards = dist.get_world_size(group) if group is not None else 1
    count = outlier_count(quantile, magnitude.numel() * shards)
    top = torch.topk(magnitude, min(count, magnitude.numel()), sorted=False).values
    if shards > 1:
        gathered = [torch.empty_like(top) for _ in range(shards)]      # same length on every shard
        dist.all_gather(gathered, top, group=group)
        top = torch.topk(torch.cat(gathered), count, sorted=False).values
    return top.min()          # the quantile, without a sort


def token_outlier_threshold(x: torch.Tensor, quantile: float, group=None) -> torch.Tensor:
    """The `quantile` of |x| over each token's K values (fp32 [M, 1]): OCC's threshold per token, so a token's
    output depends on that token alone. group: x [M, K_shard] is one tensor-parallel shard of the columns; as in
    outlier_threshold, every global top value of a row is among its shard's own top `count`, so gathering those
    gives the row's exact quantile over all K."""
    magnitude = x.detach().abs().float()
    shards = dist.get_world_size(group) if group is not None else 1
    count = outlier_count(quantile, x.shape[-1] * shards)
    top = torch.topk(magnitude, min(count, x.shape[-1]), dim=-1, sorted=False).values
    if shards > 1:
        gathered = [torch.empty_like(top) for _ in range(shards)]
        dist.all_gather(gathered, top.contiguous(), group=group)
        top = torch.topk(torch.cat(gathered, dim=-1), count, dim=-1, sorted=False).values
    return top.amin(dim=-1, keepdim=True)


DENSE_COLUMN_SHARE = 1 / 32   # a column with outliers in more than this share of rows is held densely


@dataclass
class Outliers:
    """OCC's residual R = x - clamp(x) [M, K], float32, in two parts. Columns where outliers are common (LLM
    activations concentrate them in a few channels) are held densely: dense_vals [M, c] for columns dense_cols [c]
    (c may be 0), multiplied by GEMMs. The rest is in compressed rows: row r's entries are
    cols[row_ptr[r]:row_ptr[r + 1]] with values vals[...], multiplied by lowbit/kernels/segment_matmul.py (a gather
    per entry). The clamp and the products are custom ops (the clamp's output sizes depend on the data); under
    torch.compile a layer with OCC still runs eagerly for now (lowbit.precision.linear.quant_linear)."""

    row_ptr: torch.Tensor      # int64 [M + 1]
    cols: torch.Tensor         # int64 [P], increasing within a row
    vals: torch.Tensor         # float32 [P]
    dense_cols: torch.Tensor   # int64 [c]
    dense_vals: torch.Tensor   # float32 [M, c]

    def tensors(self) -> tuple:
        """What autograd saves; Outliers(*tensors) rebuilds it."""
        return self.row_ptr, self.cols, self.vals, self.dense_cols, self.dense_vals

    def matmul_add(self, out: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """round(out + R b) for out [M, N], b [K, N]: a new tensor of out's dtype."""
        return torch.ops.lowbit.occ_matmul_add(out, *self.tensors(), b)

    def t_matmul(self, b: torch.Tensor, k: int) -> torch.Tensor:
        """R^T b (float32 [K, N]) for b [M, N]."""
        return torch.ops.lowbit.occ_t_matmul(*self.tensors(), b, k)

    def rows(self) -> torch.Tensor:
        """The row index of every sparse entry (int64 [P])."""
        return _rows(self.row_ptr, self.cols)

    def to_dense(self, k: int) -> torch.Tensor:
        dense = torch.zeros(self.row_ptr.shape[0] - 1, k, dtype=torch.float32, device=self.vals.device)
        dense[self.rows(), self.cols] = self.vals
        dense[:, self.dense_cols] = self.dense_vals
        return dense


class DenseResidual:
    """OCC's residual R = x - clamp(x) [M, K] held as a full matrix in x's dtype (zero but at the ~(1 - quantile)
    outliers), its products run as GEMMs on tensor cores. Shapes are static, so torch.compile keeps the layer in
    its graph (the compressed-row `Outliers` has data-dependent sizes). In bfloat16, x - clamp(x) is rounded once:
    at most 2^-9 of |R|, against FP4's 2^-2 on every other entry. Same interface as `Outliers`."""

    def __init__(self, values: torch.Tensor):
        self.values = values

    def tensors(self) -> tuple:
        return (self.values,)

    def matmul_add(self, out: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """out + R b for out [M, N], b [K, N], one GEMM in out's dtype (float32 accumulation)."""
        return torch.addmm(out, self.values.to(out.dtype), b.to(out.dtype))

    def t_matmul(self, b: torch.Tensor, k: int) -> torch.Tensor:
        """R^T b (float32 [K, N]) for b [M, N], one GEMM in b's dtype."""
        return (self.values.t().to(b.dtype) @ b).float()

    def to_dense(self, k: int) -> torch.Tensor:
        return self.values.float()


def residual_from(tensors: tuple) -> "Outliers | DenseResidual":
    """The residual object of what autograd saved (Outliers.tensors() or DenseResidual.tensors())."""
    return DenseResidual(*tensors) if len(tensors) == 1 else Outliers(*tensors)


def _rows(row_ptr: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(row_ptr.shape[0] - 1, device=cols.device), row_ptr.diff(),
                                   output_size=cols.numel())


def clamp_to(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """x clamped to +-threshold (NaN stays NaN): OCC's clamp, for both residual forms."""
    return torch.maximum(torch.minimum(x, threshold), -threshold)


def clamp_outliers(x: torch.Tensor, quantile: float, group=None, dense_share: float = DENSE_COLUMN_SHARE,
                   product: str = "sparse", scope: str = "tensor") -> tuple[torch.Tensor, "Outliers | DenseResidual"]:
    """Outlier Clamping (arXiv 2501.17116 sec. 3.2): clamp x [M, K] to +-(the `quantile` of |x| over the
    tensor) -> (clamped x [M, K] in x's dtype, the residual x - clamped as `Outliers`, float32).

    The residual holds about (1 - quantile) of the entries; its product with the weight is added back
    in high precision (the Compensation), so the layer's output keeps the outliers. `group`: x is a
    tensor-parallel shard; the threshold is that of the whole tensor (see outlier_threshold). product="sparse":
    the residual in compressed rows (`Outliers`; columns with outliers in more than `dense_share` of the rows form
    its dense part); product="dense": the residual as a full matrix (`DenseResidual`, static shapes).
    scope="token": each token (row) is clamped at its own quantile (token_outlier_threshold); dense product only.
    """
    if scope == "token":
        if product != "dense":
            raise ValueError(f"OCC with scope='token' needs product='dense' (got {product!r})")
        clamped = clamp_to(x, token_outlier_threshold(x, quantile, group).to(x.dtype))
        return clamped, DenseResidual(x - clamped)
    threshold = outlier_threshold(x, quantile, group).to(x.dtype)
    if product == "dense":
        clamped = clamp_to(x, threshold)
        return clamped, DenseResidual(x - clamped)
    clamped, *parts = torch.ops.lowbit.occ_clamp(x, threshold, dense_share)
    return clamped, Outliers(*parts)


@torch.library.custom_op("lowbit::occ_clamp", mutates_args=())
def _occ_clamp(x: torch.Tensor, threshold: torch.Tensor, dense_share: float) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """clamp(x, +-threshold) and the residual's parts (see Outliers); sizes depend on the data (two host
    synchronisations: which columns are dense, how many other outliers), hence a custom op. On CUDA two Triton
    passes over x (lowbit/kernels/occ_clamp.py, bit for bit the same); the PyTorch path below elsewhere."""
    if use_triton_for(x):
        return occ_clamp_triton(x, threshold, dense_share)
    return occ_clamp_torch(x, threshold, dense_share)


def occ_clamp_torch(x: torch.Tensor, threshold: torch.Tensor, dense_share: float) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PyTorch path of `lowbit::occ_clamp` (CPU, and the reference of the Triton passes)."""
    clamped = clamp_to(x, threshold)
    outlier = x.abs() > threshold                                 # exactly where x - clamped != 0
    dense_cols = (outlier.sum(0) > x.shape[0] * dense_share).nonzero().squeeze(1)
    dense_vals = x[:, dense_cols].float() - clamped[:, dense_cols].float()
    outlier[:, dense_cols] = False
    rows, cols = outlier.nonzero(as_tuple=True)                   # row-major order: compressed rows for free
    row_ptr = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
    row_ptr[1:] = outlier.sum(1).cumsum(0)
    vals = x[rows, cols].float() - clamped[rows, cols].float()
    return clamped, row_ptr, cols, vals, dense_cols, dense_vals


@_occ_clamp.register_fake
def _(x, threshold, dense_share):
    ctx = torch.library.get_ctx()
    entries, columns = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    rows = x.shape[0]
    return (torch.empty_like(x), x.new_empty(rows + 1, dtype=torch.int64), x.new_empty(entries, dtype=torch.int64),
            x.new_empty(entries, dtype=torch.float32), x.new_empty(columns, dtype=torch.int64),
            x.new_empty(rows, columns, dtype=torch.float32))


@torch.library.custom_op("lowbit::occ_matmul_add", mutates_args=())
def _occ_matmul_add(out: torch.Tensor, row_ptr: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
                    dense_cols: torch.Tensor, dense_vals: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """round(out + R b): the dense columns by a float32 GEMM, the rest by the segment kernel, one rounding."""
    if dense_cols.numel() == 0:
        return segment_matmul_add_(out.clone(), row_ptr, cols, vals, b)
    total = torch.addmm(out.float(), dense_vals, b[dense_cols].float())
    return segment_matmul_add_(total, row_ptr, cols, vals, b).to(out.dtype)


@_occ_matmul_add.register_fake
def _(out, row_ptr, cols, vals, dense_cols, dense_vals, b):
    return torch.empty_like(out)


@torch.library.custom_op("lowbit::occ_t_matmul", mutates_args=())
def _occ_t_matmul(row_ptr: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, dense_cols: torch.Tensor,
                  dense_vals: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """R^T b (float32 [k, N]): the dense columns by a GEMM, the sparse entries regrouped by column (a stable
    sort keeps the sum's order fixed), then the segment kernel."""
    out = torch.zeros(k, b.shape[1], dtype=torch.float32, device=b.device)
    if dense_cols.numel():
        out[dense_cols] = dense_vals.t() @ b.float()
    order = torch.argsort(cols, stable=True)
    col_ptr = torch.zeros(k + 1, dtype=torch.int64, device=cols.device)
    col_ptr[1:] = torch.zeros_like(col_ptr[1:]).index_add_(0, cols, torch.ones_like(cols)).cumsum(0)
    return segment_matmul_add_(out, col_ptr, _rows(row_ptr, cols)[order], vals[order], b)


@_occ_t_matmul.register_fake
def _(row_ptr, cols, vals, dense_cols, dense_vals, b, k):
    return b.new_empty(k, b.shape[1], dtype=torch.float32)


def hadamard_matrix(size: int, signs: torch.Tensor) -> torch.Tensor:
    """Random orthogonal D H / sqrt(size): Sylvester Hadamard H, random +-1 diagonal `signs` [size]. float32."""
    matrix = torch.ones(1, 1, device=signs.device)          # built where the signs live: no host round trip
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return signs.float().reshape(-1, 1) * matrix / math.sqrt(size)


def hadamard_last_axis(t: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """Apply the block-diagonal transform along the last axis of t [R, C] (C a multiple of its size).

    Used on both wgrad inputs dy^T [N, M] and x^T [K, M] along the token axis M: with Q orthogonal,
    (dy^T Q)(x^T Q)^T = dy^T x, while outliers are spread over each block before quantization
    (Quartet; NVIDIA's NVFP4 recipe uses 16 x 16 blocks).

    A float32 product per block: the CPU path, the tests' reference and the fallback for sizes the kernel does not
    take. CUDA operands take hadamard_transposed's kernel (on an H200 this product cost 0.25-0.29 s of an NVFP4
    llama_1b step and a Walsh-Hadamard butterfly under torch.compile ~0.73 s; the kernel 0.09 s; 2026-12-02).
    """
    rows, cols = t.shape
    size = transform.shape[0]
    blocks = t.reshape(rows, cols // size, size).float() @ transform
    return blocks.reshape(rows, cols).to(t.dtype)


def hadamard_transposed(t: torch.Tensor, transform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hadamard_last_axis(t.t(), transform) as a contiguous tensor, its amax or None): t [R, C] -> [C, R], the
    transform along R. On CUDA one Triton pass that also takes the amax (lowbit/kernels/hadamard_triton.py; under
    torch.compile Dynamo traces the launch and Inductor's wrapper calls the kernel: as an opaque custom op its
    Python dispatch cost 196 us of CPU per call, 0.35 s of a host-bound NVFP4 llama_1b step on an H200, 2026-12-02),
    elsewhere hadamard_last_axis and no amax."""
    from lowbit.kernels import hadamard_triton
    if t.is_cuda and hadamard_triton.supports(t, transform):
        return hadamard_triton.hadamard_transpose_triton(t, transform)
    return hadamard_last_axis(t.t(), transform).contiguous(), None

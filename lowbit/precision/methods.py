"""Training methods around the quantizer: DGE, OCC (arXiv 2501.17116) and the random Hadamard transform."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

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
    count = max(1, math.ceil((1.0 - quantile) * magnitude.numel() * shards))
    top = torch.topk(magnitude, min(count, magnitude.numel()), sorted=False).values
    if shards > 1:
        gathered = [torch.empty_like(top) for _ in range(shards)]      # same length on every shard
        dist.all_gather(gathered, top, group=group)
        top = torch.topk(torch.cat(gathered), count, sorted=False).values
    return top.min()          # the quantile, without a sort


@dataclass
class Outliers:
    """OCC's residual R = x - clamp(x) [M, K], float32, in compressed-row form: row r's entries are
    cols[row_ptr[r]:row_ptr[r + 1]] with values vals[...] (lowbit/kernels/segment_matmul.py multiplies it)."""

    row_ptr: torch.Tensor      # int64 [M + 1]
    cols: torch.Tensor         # int64 [P], increasing within a row
    vals: torch.Tensor         # float32 [P]
    shape: tuple[int, int]

    def matmul_add_(self, out: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """out [M, N] <- round(out + R b), b [K, N]; in place."""
        return segment_matmul_add_(out, self.row_ptr, self.cols, self.vals, b)

    def t_matmul(self, b: torch.Tensor) -> torch.Tensor:
        """R^T b (float32 [K, N]) for b [M, N]: the entries regrouped by column, then the same product."""
        order = torch.argsort(self.cols, stable=True)
        col_ptr = torch.zeros(self.shape[1] + 1, dtype=torch.int64, device=self.cols.device)
        col_ptr[1:] = torch.bincount(self.cols, minlength=self.shape[1]).cumsum(0)
        out = torch.zeros(self.shape[1], b.shape[1], dtype=torch.float32, device=b.device)
        return segment_matmul_add_(out, col_ptr, self.rows()[order], self.vals[order], b)

    def rows(self) -> torch.Tensor:
        """The row index of every entry (int64 [P])."""
        return torch.repeat_interleave(torch.arange(self.shape[0], device=self.cols.device), self.row_ptr.diff())

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.shape, dtype=torch.float32, device=self.vals.device)
        dense[self.rows(), self.cols] = self.vals
        return dense


def clamp_outliers(x: torch.Tensor, quantile: float, group=None) -> tuple[torch.Tensor, Outliers]:
    """Outlier Clamping (arXiv 2501.17116 sec. 3.2): clamp x [M, K] to +-(the `quantile` of |x| over the
    tensor) -> (clamped x [M, K] in x's dtype, the residual x - clamped as `Outliers`, float32).

    The residual holds about (1 - quantile) of the entries; its product with the weight is added back
    in high precision (the Compensation), so the layer's output keeps the outliers. `group`: x is a
    tensor-parallel shard; the threshold is that of the whole tensor (see outlier_threshold).
    One host synchronisation: the number of outliers sizes the residual.
    """
    threshold = outlier_threshold(x, quantile, group).to(x.dtype)
    clamped = torch.maximum(torch.minimum(x, threshold), -threshold)
    residual = x.float() - clamped.float()
    rows, cols = residual.nonzero(as_tuple=True)          # row-major order: compressed rows for free
    row_ptr = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
    row_ptr[1:] = torch.bincount(rows, minlength=x.shape[0]).cumsum(0)
    return clamped, Outliers(row_ptr, cols, residual[rows, cols], tuple(x.shape))


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
    """
    rows, cols = t.shape
    size = transform.shape[0]
    blocks = t.reshape(rows, cols // size, size).float() @ transform
    return blocks.reshape(rows, cols).to(t.dtype)

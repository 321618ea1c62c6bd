"""One FP4 block quantize launch per variant, for Nsight Compute (bench/device_pending.sh ncu_blocks):

    ncu --clock-control none --kernel-name regex:_quantize_blocks_kernel --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy ... python3 bench/ncu_blocks.py mxfp4_x

Variants: {mxfp4,nvfp4}_{x,pair,sr} at 8192 x 4096 bf16 (NVFP4 with its tensor amax given, so that the block kernel
alone is launched; sr: x side with stochastic rounding by the kernel's Philox noise). Each runs three times: two
warm-ups (compile, cache) and the measured launch.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.kernels.quantize_blocks_triton import quantize_blocks_triton  # noqa: E402
from lowbit.precision.formats import E2M1  # noqa: E402
from lowbit.precision.scaling import Quantizer  # noqa: E402

QUANTIZERS = {"mxfp4": Quantizer(E2M1, 1, 32, "pow2"), "nvfp4": Quantizer(E2M1, 1, 16, "nvfp4")}


def main(variant: str) -> None:
    fmt, side = variant.split("_")
    q = QUANTIZERS[fmt]
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    amax = x.abs().amax().float().reshape(1) if fmt == "nvfp4" else None
    seed = torch.tensor([7], device="cuda", dtype=torch.int64) if side == "sr" else None
    for _ in range(3):
        quantize_blocks_triton(x, q, q if side == "pair" else None, seed=seed, tensor_amax=amax)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1])

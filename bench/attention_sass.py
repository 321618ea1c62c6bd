"""The fused target kernel's main loop as Hopper machine code, without a GPU: the kernel is compiled for sm_90 by
Triton's own ptxas and its key-tile loops are counted (instructions per warp and per tile, CTA-wide barriers,
special-function (MUFU) and FMA instructions, shared-memory and global stores, spills). What a timing on the GPU
cannot show: why a variant of the loop is faster or not (issue 4; docs/RESULTS.md, thirty-second session).

    python bench/attention_sass.py                       # 128 rows x 64 keys, 8 warps, 3 stages, K/V by TMA
    python bench/attention_sass.py --block-m 64 --warps 4 --stages 2
    python bench/attention_sass.py --constexpr EXP_FMA=1 # a patched kernel's extra compile-time switches
    python bench/attention_sass.py --gluon --stages 2 --block-n 128   # the Hopper (Gluon) kernel instead
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowbit.kernels import sass as machine_code  # noqa: E402
from lowbit.kernels.attention_target_triton import attention_target_kernel  # noqa: E402

POINTERS = ("Q", "K", "V", "K_desc", "V_desc", "Out")


def compile_sm90(block_m: int, block_n: int, head_dim: int, tma: bool, warps: int, stages: int, **variant):
    """The kernel compiled for sm_90 (bf16 inputs, B=64): machine_code.dump's SASS text and resource use."""
    names = attention_target_kernel.arg_names
    signature = {name: "i32" for name in names}
    signature.update({name: "*bf16" for name in POINTERS})
    signature.update(Target="*fp32", RowMax="*fp32", scale_log2="fp32")
    if tma:
        signature["K_desc"] = signature["V_desc"] = f"tensordesc<bf16[1,{block_n},{head_dim}]>"
    constants = dict(BLOCK_M=block_m, BLOCK=64, BLOCK_N=block_n, HEAD_DIM=head_dim, POOL=16, TMA=tma, **variant)
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=attention_target_kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    return machine_code.dump(triton.compile(source, target=GPUTarget("cuda", 90, 64),
                                            options=dict(num_warps=warps, num_stages=stages)))


def key_tile_loops(sass: str) -> list[dict]:
    """Each loop that issues a tensor-core MMA (a backward branch around an HGMMA): its instruction mix per warp."""
    counts = []
    for loop in machine_code.loops(sass):
        if any("HGMMA" in text for text in loop["body"]):
            ops = machine_code.opcodes(loop["body"])
            counts.append({"instructions": len(loop["body"]), **{op: ops.get(op, 0) for op in (
                "BAR", "MUFU", "FFMA", "FMUL", "FADD", "FMNMX", "HGMMA", "STS", "LDS", "STG", "STL", "LDL", "R2UR")}})
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-m", type=int, default=128)
    parser.add_argument("--block-n", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warps", type=int, default=8)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--tma", type=int, default=1, choices=[0, 1])
    parser.add_argument("--constexpr", nargs="*", default=[], metavar="NAME=INT",
                        help="more compile-time arguments of the kernel (e.g. a patched variant's switches)")
    parser.add_argument("--gluon", action="store_true", help="the Gluon kernel (attention_target_gluon) instead")
    args = parser.parse_args()
    if args.gluon:
        from lowbit.kernels.attention_target_gluon import hopper_binary
        binary = hopper_binary(args.head_dim, args.stages, tile_n=args.block_n)
        print(f"Triton {triton.__version__}, sm_90, Gluon kernel, 2 x 64 rows x {args.block_n} keys, "
              f"head dim {args.head_dim}, "
              f"{args.stages} K/V stages: {binary['registers']} registers at launch, {binary['spill_bytes']} B spill "
              f"stack, {binary['shared_bytes'] / 1024:.0f} KiB shared")
        # every loop around an HGMMA, in code order: the consumers' key-tile loops (their masked branch included)
        # and the work-item loops around them
        print_loops(binary["sass"], tuple(f"loop {i}" for i in range(1, 9)))
        return
    extra = {name: int(value) for name, value in (item.split("=") for item in args.constexpr)}
    use = compile_sm90(args.block_m, args.block_n, args.head_dim, bool(args.tma), args.warps, args.stages, **extra)
    sass = use["sass"]
    a_operand = "registers" if re.search(r"HGMMA\.64x\d+x16\.F32\.BF16 R\d+, R\d+, gdesc\[UR\d+\], ", sass) else "shared"
    print(f"Triton {triton.__version__}, sm_90, {args.block_m} rows x {args.block_n} keys, head dim {args.head_dim}, "
          f"{args.warps} warps, {args.stages} stages, K/V by {'TMA' if args.tma else 'pointers'} {extra or ''}: "
          f"{use['registers']} registers, {use['spill_bytes']} B spill stack, "
          f"{use['shared_bytes'] / 1024:.0f} KiB shared, q k^T's A operand from {a_operand}")
    print_loops(sass, ("unmasked", "diagonal"))


def print_loops(sass: str, names: tuple[str, ...]) -> None:
    """The key-tile loops' instruction mix as a Markdown table."""
    print("| loop | instructions / warp | BAR | MUFU | FFMA | FMUL | FMNMX+FADD | HGMMA | STS+LDS | STG | STL+LDL "
          "| R2UR |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, loop in zip(names, key_tile_loops(sass)):
        print(f"| {name} | {loop['instructions']} | {loop['BAR']} | {loop['MUFU']} | {loop['FFMA']} | {loop['FMUL']} | "
              f"{loop['FMNMX'] + loop['FADD']} | {loop['HGMMA']} | {loop['STS'] + loop['LDS']} | {loop['STG']} | "
              f"{loop['STL'] + loop['LDL']} | {loop['R2UR']} |")


if __name__ == "__main__":
    main()

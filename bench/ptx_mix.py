"""Instruction mix of the FP4 block quantize kernel, compiled ahead of time for Hopper (sm_90) on any machine: no GPU
needed, only Triton's bundled ptxas and cuobjdump. For each format at its default tile
(quantize_blocks_triton.FP4_PAIR_TILES) and each side (x alone, x^T alone, the pair): the PTX and SASS instructions
per element a thread handles, the IEEE divisions (PTX div.rn, each a sequence in SASS with a slow-path call) and the
most frequent SASS opcodes. `--swap-rules` adds each tile with the other format's scale rule, which isolates what
NVFP4's E4M3 block scales cost against MXFP4's power-of-two ones. Counts are static (unrolled code, the divisions'
slow path included), a proxy for the integer/ALU pipe load that bounds these kernels on an H200 (Nsight Compute,
docs/RESULTS.md); the local Triton may differ from the GPU image's.

    python bench/ptx_mix.py [--swap-rules] [--maxnreg 144 128] [--gluon]
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lowbit.kernels import quantize_blocks_triton as blocks

FORMATS = {"nvfp4": (blocks.RULES["nvfp4"], 16), "mxfp4": (blocks.RULES["pow2"], 32)}   # (scale rule, block)
ARGS = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "qt_ptr": "*fp8e4nv", "qt_desc": "*fp8e4nv", "scale_ptr": "*fp32",
        "scale_t_ptr": "*fp32", "tensor_amax_ptr": "*fp32", "gain_ptr": "*fp32", "noise_ptr": "*fp32",
        "R": "i32", "C": "i32", "stride_r": "i32"}      # the runtime arguments: pointers and three integers


def compile_kernel(rule: int, block: int, tile: tuple[int, int, int], x_side: bool, t_side: bool,
                   maxnreg: int | None = None, packed: bool = False, narrow: bool = False) -> dict:
    """PTX and cubin of the block kernel for 1 x `block` E2M1 blocks on both sides, round to nearest, pointer stores
    (registers per thread capped at `maxnreg`, as quantize_blocks_triton.PAIR_MAXNREG does; x_q stored 8 bytes per
    thread if `narrow`, as NARROW_PAIR_STORE does for MXFP4 pairs)."""
    kernel = blocks._quantize_blocks_kernel
    constants = dict(BLOCK_R=tile[0], BLOCK_C=tile[1], BR=1, BC=block, BR_T=1, BC_T=block, TRANSPOSE=t_side,
                     RULE=rule, MAX=6.0, MIN_EXP=0, MBITS=1, HW=False, SAME_T=False, X_SIDE=x_side, NOISE=0,
                     TMA_T=False, GPU_MATH=True, PACKED=packed, NARROW_Q=narrow)
    signature = {**ARGS, **{name: "constexpr" for name in constants}}
    # the JIT's specialisation at the shapes that matter: 16-byte aligned pointers, R, C and the row stride multiples
    # of 16 (without it the loads are not vectorised and the layout, hence the code, differs)
    aligned = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in ARGS if name != "qt_desc"}
    source = ASTSource(fn=kernel, signature=signature, attrs=aligned,
                       constexprs={(kernel.arg_names.index(name),): value for name, value in constants.items()})
    options = {"num_warps": tile[2], **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm


def mix(ptx: str) -> collections.Counter:
    return collections.Counter(re.findall(r"^\s+([a-z]+[.\w]*)", ptx, re.M))


def sass_mix(cubin: bytes) -> collections.Counter:
    """SASS opcodes (cuobjdump, bundled with Triton), predicates and control codes stripped."""
    from triton.tools.disasm import get_sass
    return collections.Counter(re.findall(r"^\S+\t(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", get_sass(cubin), re.M))


def registers(cubin: bytes) -> str:
    """Registers per thread and spill stack bytes (cuobjdump -res-usage, bundled with Triton), and the resident
    warps per SM they allow (65,536 registers, allocated per warp in units of 256)."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", file.name], capture_output=True, text=True).stdout
    regs, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    return f"{regs} registers ({65536 // (-(-regs * 32 // 256) * 256)} warps/SM), stack {stack} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swap-rules", action="store_true", help="also each tile with the other format's scale rule")
    parser.add_argument("--maxnreg", type=int, nargs="*", default=[], help="also each kernel capped at these registers")
    parser.add_argument("--gluon", action="store_true", help="also the Triton MXFP4 kernel with E2M1 in f16x2, and the "
                        "Gluon pair kernel (quantize_fp4_gluon) at its tiles, f16x2 or float32 rounding, x^T by a "
                        "second load or through shared memory")
    args = parser.parse_args()
    variants = [(name, name, *FORMATS[name]) for name in FORMATS]
    if args.swap_rules:
        variants += [("nvfp4 tile, pow2 scales", "nvfp4", FORMATS["mxfp4"][0], 16),
                     ("mxfp4 tile, nvfp4 scales", "mxfp4", FORMATS["nvfp4"][0], 32)]
    print(f"Triton {triton.__version__}, sm_90; per element: static instructions / elements a thread handles")
    for label, tile_of, rule, block in variants:
        tile = blocks.FP4_PAIR_TILES[FORMATS[tile_of][1]]
        per_thread = tile[0] * tile[1] / (32 * tile[2])
        runs = [(maxnreg, False) for maxnreg in [None] + args.maxnreg]
        runs += [(None, True)] if args.gluon and rule == FORMATS["mxfp4"][0] else []    # E2M1 in f16x2
        for maxnreg, packed in runs:
            for side, (x_side, t_side) in (("x", (True, False)), ("x^T", (False, True)), ("pair", (True, True))):
                narrow = blocks.NARROW_PAIR_STORE and block == 32 and x_side and t_side     # as dispatched
                asm = compile_kernel(rule, block, tile, x_side, t_side, maxnreg, packed, narrow)
                ops, sass = mix(asm["ptx"]), sass_mix(asm["cubin"])
                divisions = sum(n for op, n in ops.items() if op.startswith("div.rn"))
                top = ", ".join(f"{op} {n}" for op, n in sass.most_common(6))
                cap = (f", maxnreg {maxnreg}" if maxnreg else "") + (", f16x2" if packed else "")
                print(f"{label + cap:26} tile {str(tile):14} {side:4} PTX {sum(ops.values()) / per_thread:5.1f} / "
                      f"SASS {sum(sass.values()) / per_thread:5.1f} per element, div.rn {divisions:4d} | "
                      f"{registers(asm['cubin'])} | SASS {top}")
    if args.gluon:
        gluon_mix()


def gluon_mix() -> None:
    """The Gluon pair kernel's SASS per element (both sides), registers and shared memory, per variant."""
    from lowbit.kernels import quantize_fp4_gluon as gluon_fp4
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quantize_fp4 import GLUON_TILES

    for name, (rule, block) in FORMATS.items():
        for tile in GLUON_TILES[block]:
            for packed in ((False, True) if name == "mxfp4" else (False,)):
                for reload in (True, False):
                    binary = gluon_fp4.sm90_binary(block, "pow2" if name == "mxfp4" else "nvfp4", tile, packed, reload)
                    sass = sass_mix_text(binary["sass"])
                    per_thread = tile[0] * tile[1] / (32 * tile[2])
                    top = ", ".join(f"{op} {n}" for op, n in sass.most_common(6))
                    print(f"gluon {name} tile {str(tile):17} {'f16x2' if packed else 'fp32 '} "
                          f"{'reload' if reload else 'smem  '} "
                          f"SASS {sum(sass.values()) / per_thread:5.1f} per element | "
                          f"{binary['registers']} registers, stack {binary['spill_bytes']} B, shared "
                          f"{binary['shared_bytes']} B | SASS {top}", flush=True)


def sass_mix_text(sass: str) -> collections.Counter:
    """SASS opcodes of cuobjdump --dump-sass text (lowbit.kernels.sass.dump), predicates and modifiers dropped."""
    return collections.Counter(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M))

if __name__ == "__main__":
    main()

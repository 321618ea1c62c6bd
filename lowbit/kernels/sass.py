"""Hopper machine code (SASS) of a kernel compiled without a GPU: Triton's own ptxas compiles for sm_90 on any
machine and cuobjdump (shipped with Triton) prints the result. For the CPU tests of the attention kernels and
bench/attention_sass.py: what a timing cannot show (which waits, moves and spills a loop holds)."""
from __future__ import annotations

import collections
import re
import subprocess
import tempfile
from pathlib import Path

import triton


def dump(kernel) -> dict:
    """{"sass", "registers", "spill_bytes", "shared_bytes"} of `kernel`, a result of `triton.compile`."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([cuobjdump, "--dump-sass", cubin.name], capture_output=True, text=True).stdout
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
    return {"sass": sass, "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "spill_bytes": int(re.search(r"STACK:(\d+)", usage).group(1)), "shared_bytes": kernel.metadata.shared}


def loops(sass: str) -> list[dict]:
    """Every loop of `sass` (a predicated branch backwards), in code order: {"body": its instructions' text,
    "innermost": no other loop inside it}."""
    code = [(int(m.group(1), 16), m.group(2).strip()) for m in
            (re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    spans = [(int(m.group(1), 16), address) for address, text in code if text.startswith("@")
             for m in [re.search(r"BRA (0x[0-9a-f]+)", text)] if m and int(m.group(1), 16) < address]
    return [{"body": [text for address, text in code if start <= address <= end],
             "innermost": not any(start <= s and e < end for s, e in spans if (s, e) != (start, end))}
            for start, end in spans]


def opcodes(body: list[str]) -> dict[str, int]:
    """How many instructions of each opcode (predicate and modifiers dropped: `@P0 HGMMA.64x64x16...` -> HGMMA)."""
    return dict(collections.Counter((text.split()[1] if text.startswith("@") else text.split()[0]).split(".")[0]
                                    for text in body))

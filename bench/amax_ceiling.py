"""How fast could `+exp=fp8_llama` run if every scale were known before its cast? A ceiling, not a recipe.

Tensorwise current scaling must reduce a tensor's amax before it can cast it, so Inductor reads each
quantized producer's inputs twice (an amax pass, then the cast fused with the producer); ~57 ms of a
761 ms fp8_llama step on an H200 (docs/RESULTS.md, twenty-sixth session). Delayed scaling (an amax history,
TransformerEngine's DelayedScaling) knows the scale beforehand, so the cast could be one pass if the next
step's amax were reduced in the same pass, which Inductor does not do: that takes hand-written producer
kernels (RMSNorm, SwiGLU and their backwards, fused with the cast and an atomic amax).

Before building those, this wrapper measures what they could buy at best. It runs train.py with every
tensorwise activation and/or output-gradient scale taken from the tensor's FIRST ROW only
(x[:1].abs().amax(): a 1-row reduction, so Inductor fuses the cast into the producer and reads it once).
Values above that row's amax saturate, so the numbers trained are wrong; only the step time means anything.
Weights keep their exact scale (quantized once per optimizer step by the weight cache).

    AMAX_CEILING=all|act|grad python bench/amax_ceiling.py +exp=fp8_llama ...      (train.py's arguments)
    python bench/train_throughput.py --variant "fp8=+exp=fp8_llama" \
        --variant "fp8_ceiling=+exp=fp8_llama entry:bench/amax_ceiling.py env:AMAX_CEILING=all"
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowbit.kernels.quantize as kernels_quantize  # noqa: E402
from lowbit.precision import scaling  # noqa: E402
from lowbit.precision.formats import cast_to_format  # noqa: E402

MODES = {"all": ("activation", "output gradient"), "act": ("activation",), "grad": ("output gradient",)}
MODE = os.environ.get("AMAX_CEILING", "all")
if MODE not in MODES:
    raise SystemExit(f"AMAX_CEILING={MODE!r}: use one of {sorted(MODES)}")
_exact = scaling.quantize_reference


def first_row_scaled(x, quantizer, noise=None, what="tensor"):
    """quantize_reference with a tensorwise operand's amax taken over its first row only (see the docstring)."""
    if not (quantizer.tensorwise and what.startswith(MODES[MODE])):
        return _exact(x, quantizer, noise, what)
    scale, inv = scaling.scales_from_amax(x[:1].float().abs().amax(), quantizer)
    return scaling.QTensor(cast_to_format(x.float() * inv, quantizer.fmt, noise), scale, quantizer)


scaling.quantize_reference = kernels_quantize.quantize_reference = first_row_scaled
print(f"[amax_ceiling] tensorwise {' and '.join(MODES[MODE])} scales from the first row only (a ceiling, not a recipe)",
      flush=True)
if __name__ == "__main__":
    import hydra

    import train        # this module stays __main__, where Dynamo's guards look up the globals above

    hydra.main(version_base=None, config_path=str(ROOT / "conf"), config_name="config")(train.main.__wrapped__)()

"""TP=2, TP=2+SP and Ulysses=2 on 2 gloo processes (float32) against the single-process model:
logits, loss and every gradient to 1e-5 relative (whole quantized models: the median gradient, the worst to 1e-3;
the trainer-level runs are in test_trainer_layouts.py).
The same for lowbit's quantized linears under TP: whole models per recipe, and single layers (column- and
row-parallel, DGE and OCC included) on identical inputs; see equivalence_worker.py."""
import json

import pytest

from tests.conftest import ROOT, run_gloo_workers

RTOL = 1e-5
QUANT_RTOL = 1e-3     # worst gradient of a whole quantized model (see equivalence_worker.py)
QUANTIZED = ["tp@fp8_rowwise", "tp_sp@fp8_tensorwise", "tp@fp8_blockwise", "tp_sp@nvfp4", "tp@fp4_vectorwise+dge"]
LINEAR = [f"linear@{r}" for r in ("fp8_tensorwise", "fp8_rowwise", "fp8_blockwise", "nvfp4", "mxfp4",
                                  "fp4_vectorwise+dge+occ", "fp4_vectorwise+dge+occ+token", "fp8_tensorwise+delayed")]
MODES = ["tp", "tp_sp", "ulysses", "ulysses_nll", *QUANTIZED, *LINEAR]


@pytest.mark.slow
def test_tp_sp_and_ulysses_match_one_process_logits_loss_and_gradients():
    result = run_gloo_workers(ROOT / "tests/parallel/equivalence_worker.py", [",".join(MODES), "12"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {r["mode"] for r in rows} == set(MODES)
    assert sum(r["mode"].startswith("linear@") for r in rows) == 2 * len(LINEAR)      # both layouts each
    for row in rows:
        quantized_model = "@" in row["mode"] and not row["mode"].startswith("linear@")
        for key in ("logits", "loss", "grad_median", "y", "y0", "y1", "dx", "dW", "db"):
            assert row.get(key, 0.0) <= RTOL, row
        assert row.get("history", 0.0) == 0.0, row          # delayed scaling's amaxes: the maxima, exact
        # one operand value carried across a rounding boundary by the all-reduce's order (equivalence_worker.py)
        assert row.get("grad", 0.0) <= (QUANT_RTOL if quantized_model else RTOL), row


@pytest.mark.slow
def test_fsdp2_mixed_precision_equals_one_process_with_rounded_weights_and_gradients():
    """parallel.fsdp_param_dtype / fsdp_reduce_dtype / fsdp_reshard_after_forward / fsdp_reduce_every_micro_batch
    (fsdp_precision_worker.py, two micro-batches per rank): each micro-batch's loss and every float32 gradient equal
    one process's rounded-weights, rounded-gradients computation to 1e-6 (measured: exactly), the layers compute in
    the parameter dtype, masters and gradients stay float32, and with `accumulate` nothing is reduced before the
    step's last micro-batch."""
    cases = ["bfloat16/float32", "bfloat16/bfloat16", "bfloat16/float32/keep", "float32/float32",
             "float32/float32/accumulate", "bfloat16/float32/accumulate", "bfloat16/bfloat16/keep/accumulate"]
    result = run_gloo_workers(ROOT / "tests/parallel/fsdp_precision_worker.py", [",".join(cases)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == cases
    for row in rows:
        assert row["loss"] <= 1e-6 and row["gradient"] <= 1e-6, row
        assert row["compute"] == ["torch." + row["case"].split("/")[0]] and row["master"] == row["grad"] == [
            "torch.float32"], row
        assert row["reduced_after_first_micro_batch"] == ("accumulate" not in row["case"]), row


@pytest.mark.slow
def test_fsdp2_fp8_all_gather_is_bit_for_bit_the_quantized_gather():
    """parallel.fsdp_fp8_all_gather (lowbit/precision/fp8_gather.py, fsdp_precision_worker.py): fp8 tensorwise linears
    under FSDP2 gather their weights as E4M3 bytes (1 byte per parameter, quantized once per optimizer step) and train
    three AdamW steps of two micro-batches to exactly the losses, gradients and parameters of FSDP2 gathering float32
    and quantizing after, eager and compiled."""
    cases = ["fp8", "fp8/compiled", "fp8/bfloat16"]
    result = run_gloo_workers(ROOT / "tests/parallel/fsdp_precision_worker.py", [",".join(cases)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    rows = {r["case"]: r for r in map(json.loads, filter(lambda l: l.startswith("{"), result.stdout.splitlines()))}
    assert list(rows) == cases
    for case in ("fp8", "fp8/compiled"):
        assert rows[case]["loss"] == rows[case]["gradient"] == rows[case]["parameter"] == 0.0, rows[case]
    assert rows["fp8/bfloat16"]["loss"] <= 1e-2, rows      # bfloat16 elsewhere; weights still from float32 shards
    for row in rows.values():
        assert row["input_dtype"] == "torch.uint8" and row["bytes_per_parameter"] == 1.0, row
        assert row["linear_sees"] == ["GatheredFP8Weight"] and row["quantized_per_weight_and_step"] == 1.0, row

"""`python -m lowbit.eval.sparsity` pieces (issue 4): token reading, the curve's rows, the plot."""
import gzip
import json
import math

import pytest
import torch

from lowbit.eval.sparsity import plot, read_tokens, sequences, sparsity_curve
from lowbit.objectives.seer_attach import attach_gates
from tests.objectives.test_seer_gate import tiny_llama


def test_read_tokens_from_jsonl_gz_and_too_little_text_is_a_clear_error(tmp_path):
    from lowbit.config import ModelConfig
    from lowbit.models.load import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name="smollm2_135m"))
    path = tmp_path / "valid.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        for text in ("To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer"):
            handle.write(json.dumps({"text": text}) + "\n")
    ids = read_tokens(str(path), tokenizer)
    expected = tokenizer("To be, or not to be, that is the question.", add_special_tokens=False)["input_ids"]
    assert ids[:len(expected)].tolist() == expected and ids[len(expected)] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="lower --num-seqs"):
        sequences(ids, 64, 2)


@pytest.mark.slow
def test_sparsity_curve_rows_have_equal_sparsity_per_budget_and_plot(tmp_path):
    model = tiny_llama()
    controller = attach_gates(model, block_size=16, use_triton="never")
    seqs = torch.randint(0, 128, (2, 160))
    rows = sparsity_curve(model, controller, seqs, [0.5, 0.8], thresholds=[0.05], match_thresholds=True)
    assert rows[0]["method"] == "dense" and rows[0]["ppl_ratio"] == 1.0
    for target in (0.5, 0.8):
        measured = {r["method"]: r["sparsity"] for r in rows if r["target_sparsity"] == target}
        assert sorted(measured) == ["gate", "oracle", "static", "untrained"]
        assert len(set(measured.values())) == 1
        # 10 blocks: the forced first + diagonal blocks cap sparsity at 1 - 19/55 = 0.65
        assert abs(measured["gate"] - min(target, 1 - 19 / 55)) < 0.03
    assert any(r["method"] == "static@matched" for r in rows)
    assert all(math.isfinite(r["ppl"]) for r in rows)
    plot(rows, str(tmp_path / "curve.png"), "test")
    assert (tmp_path / "curve.png").stat().st_size > 1000

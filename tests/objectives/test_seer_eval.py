"""`python -m lowbit.eval.sparsity` pieces (issue 4): token reading, the curve's rows, the plot."""
import gzip
import json
import math
import re

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


@pytest.mark.parametrize("argv,message", [
    ([], "pass --text FILE or --tokens FILE.npy"),
    (["--text", "/nonexistent.txt"], "--text '/nonexistent.txt' does not exist"),
    (["--tokens", "TEXT", "--sparsities", "0.5", "1.5"], r"--sparsities \[1.5\] must lie strictly between 0 and 1"),
    (["--tokens", "TEXT", "--block-size", "48"], r"--block-size 48 is not supported; use one of \[16, 32, 64, 128\]"),
    (["--tokens", "TEXT", "--seq-len", "32"], r"--seq-len 32 must hold one block of fresh gates \(--block-size 64\)"),
    (["--tokens", "TEXT", "--num-seqs", "0"], "--num-seqs 0 and --micro-batch 1 must be at least 1"),
])
def test_bad_arguments_stop_before_the_model_loads(argv, message, tmp_path, capsys):
    from lowbit.eval.sparsity import main

    text = tmp_path / "tokens.npy"
    text.write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        main([str(text) if a == "TEXT" else a for a in argv] + ["--model", "no_such_preset"])
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err)

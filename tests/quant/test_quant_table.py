"""The perplexity table command on llama_tiny: rows, and a packed RTN export scores exactly like RTN itself."""
import copy
import json
import math
import re

import pytest
import torch

from lowbit.eval import quant_table
from lowbit.quant.fake_quant import make_format
from lowbit.quant.linear import attach_fake_quant
from lowbit.quant.pack import export_packed


@pytest.mark.slow
def test_quant_table_rows_and_packed_rtn_matches_rtn(tmp_path):
    text = tmp_path / "held.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"To be or not to be, line {i}, that is the question."})
                              for i in range(40)))
    base, tokenizer = quant_table.load_model("llama_tiny")
    rtn = copy.deepcopy(base)
    attach_fake_quant(rtn, make_format("int4", 64), ["*.layers.*"], ["*lm_head*", "*embed*"])
    packed = export_packed(rtn, tmp_path / "rtn.safetensors")
    out = tmp_path / "table.md"
    result = quant_table.main(["--model", "llama_tiny", "--format", "int4", "--group-size", "64", "--heldout", str(text),
                               "--calib", str(text), "--seq-len", "32", "--max-tokens", "512", "--batch-size", "4",
                               "--run", f"packed RTN={packed}", "--out", str(out)])
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in result.splitlines()
            if line.startswith("| ") and not line.startswith("| model")}
    assert list(rows) == ["teacher (bf16)", "RTN int4 g64", "clipped RTN int4 g64", "packed RTN"]
    assert rows["packed RTN"] == rows["RTN int4 g64"]
    assert all(math.isfinite(v) and v > 1 for v in rows.values())
    assert out.read_text().startswith("### llama_tiny int4 g64")
    windows = quant_table.token_windows(str(text), tokenizer, 32, 512)
    with torch.no_grad():                                    # teacher row against a direct float64 NLL
        logits = base.to(torch.bfloat16)(input_ids=windows).logits[:, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert rows["teacher (bf16)"] == pytest.approx(math.exp(nll.item()), rel=1e-3)


@pytest.mark.parametrize("argv,message", [
    (["--heldout", "README.md"], "--heldout 'README.md' is not an existing .txt, .jsonl or .jsonl.gz file"),
    (["--format", "int5"], r"--format='int5' is not supported \(int5 is not supported: use 2, 3 or 4 bits\)"),
    (["--group-size", "48"], r"--group-size=48 is not supported by int3; choose one of \[32, 64, 128, 256\]"),
    (["--run", "foo"], "--run 'foo': use NAME=RUN_DIR/quantized/model.safetensors"),
    (["--run", "x=/nonexistent/model.safetensors"], "/nonexistent/model.safetensors does not exist"),
])
def test_bad_arguments_stop_before_any_model_loads(argv, message, tmp_path, capsys):
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("some text")
    with pytest.raises(SystemExit) as stop:
        quant_table.main(["--heldout", str(heldout), "--model", "no_such_preset"] + argv)
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err)

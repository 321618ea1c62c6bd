"""Model loading (config / GGUF / local path) and the perplexity bar against plain transformers."""
import json
import math

import pytest
import torch

from lowbit.config import ModelConfig
from lowbit.models import load as model_load
from lowbit.models.flops import flops_per_token, matmul_parameters
from tests.conftest import compose


def test_random_init_is_seeded_and_sized_by_the_tokenizer():
    cfg = compose(["model=llama_tiny"]).model
    a, tokenizer = model_load.load(cfg, seed=3)
    b, _ = model_load.load(cfg, seed=3)
    assert a.config.vocab_size == len(tokenizer) == 49152
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_flops_per_token_counts_every_matmul():
    cfg = compose(["model=llama_tiny"]).model
    model, _ = model_load.load(cfg)
    c = model.config
    hidden, inter, layers, kv = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_key_value_heads
    head = hidden // c.num_attention_heads
    per_layer = hidden * hidden * 2 + 2 * hidden * kv * head + 3 * hidden * inter
    expected = layers * per_layer + c.vocab_size * hidden          # + lm_head
    assert matmul_parameters(model) == expected
    assert flops_per_token(model, 128) == 6 * expected + 12 * layers * hidden * 128


def test_missing_paths_and_bad_values_fail_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_load.load(ModelConfig(name="x", source="pretrained", name_or_path=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="model.name_or_path=.* does not exist"):     # the tokenizer is the model's
        model_load.load_tokenizer(ModelConfig(name="x", name_or_path=str(tmp_path / "nope"), tokenizer=""))
    with pytest.raises(FileNotFoundError, match="model.tokenizer=.* does not exist"):
        model_load.load_tokenizer(ModelConfig(name="x", tokenizer=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="gguf_file"):
        model_load.load(ModelConfig(name="x", source="gguf", name_or_path=str(tmp_path), gguf_file="m.gguf"))
    with pytest.raises(ValueError, match="model.source"):
        model_load.load(ModelConfig(name="x", source="magic"))
    with pytest.raises(ValueError, match="model.dtype"):
        model_load.load(ModelConfig(name="x", dtype="int8"))


@pytest.mark.slow
def test_smollm2_validation_perplexity_equals_plain_transformers(tmp_path):
    """The bar: lowbit's validation perplexity of SmolLM2-135M on Shakespeare == a plain HF forward, 1e-4 rel."""
    from transformers import AutoModelForCausalLM

    from lowbit import data as data_module
    from lowbit.train.run import run

    seq_len, batches, micro = 256, 2, 2
    overrides = ["model=smollm2_135m", f"data.seq_len={seq_len}", "trainer.max_steps=0",
                 f"trainer.eval_batches={batches}", f"trainer.micro_batch_size={micro}",
                 f"trainer.global_batch_size={micro}", "trainer.export=false", "logger.backends=[jsonl]",
                 f"run_dir={tmp_path}"]
    cfg = compose(overrides)
    run(cfg)
    record = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lowbit_ppl = next(r["val/perplexity"] for r in record if "val/perplexity" in r)

    # Reference: transformers straight from the GGUF (not lowbit's cached conversion), HF's own loss.
    directory, gguf = model_load.resolve_embedded("embedded:smollm2")
    reference = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32).eval()
    tokenizer = model_load.load_tokenizer(cfg.model)
    tokens = data_module.build(cfg.data, tokenizer).val_tokens
    ids = torch.as_tensor(tokens[: batches * micro * seq_len].astype("int64")).view(-1, seq_len)
    with torch.no_grad():
        losses = [reference(input_ids=row[None], labels=row[None]).loss.double() for row in ids]
    reference_ppl = math.exp(torch.stack(losses).mean().item())
    assert abs(lowbit_ppl - reference_ppl) / reference_ppl < 1e-4, (lowbit_ppl, reference_ppl)
    assert 3 < reference_ppl < 200      # a real model on real text, not noise

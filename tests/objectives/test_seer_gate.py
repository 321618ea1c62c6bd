"""SeerAttention gates (issue 4): gate module pieces, training on a frozen model, checkpoints, bad input."""
import copy
import json
import math

import pytest
import torch

from lowbit.objectives import seer_select as select
from lowbit.objectives.seer_attach import attach_gates, detach_gates, find_attention_layers
from lowbit.objectives.seer_checkpoint import base_weights_digest, load_gates, save_gates
from lowbit.objectives.seer_module import AttentionGate, apply_rope, block_pool, undo_rope
from tests.conftest import compose


def tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, init=0.3, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                         initializer_range=init, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def test_undo_rope_inverts_rope_and_pooling_handles_a_partial_block():
    x = torch.randn(2, 3, 10, 16, dtype=torch.float64)
    angles = torch.rand(1, 10, 8, dtype=torch.float64) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    torch.testing.assert_close(undo_rope(apply_rope(x, cos, sin), cos, sin), x)
    pooled = block_pool(x, 4, "avg")
    assert pooled.shape == (2, 3, 3, 16)
    torch.testing.assert_close(pooled[:, :, 2], x[:, :, 8:].mean(2))
    torch.testing.assert_close(block_pool(x, 4, "max")[:, :, 2], x[:, :, 8:].amax(2))
    torch.testing.assert_close(block_pool(x, 4, "min")[:, :, 1], x[:, :, 4:8].amin(2))


@pytest.mark.parametrize("gate,heads", [("prefill", "kv_group"), ("prefill", "query"), ("decode", "kv_group")])
def test_gate_outputs_causal_log_distributions(gate, heads):
    model = tiny_llama()
    module = AttentionGate(q_heads=4, kv_heads=2, head_dim=16, block_size=16, gate=gate, heads=heads)
    log_gate = module(torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16), model.model.rotary_emb)
    rows = 3 if gate == "prefill" else 40
    assert log_gate.shape == (1, 2 if heads == "kv_group" else 4, rows, 3)
    torch.testing.assert_close(log_gate.exp().sum(-1), torch.ones(log_gate.shape[:-1]))
    if gate == "prefill":
        assert torch.isinf(log_gate[..., 0, 1:]).all() and torch.isfinite(log_gate[..., 2, :]).all()
    else:
        assert torch.isinf(log_gate[..., 15, 1:]).all() and torch.isfinite(log_gate[..., 16, :2]).all()


@pytest.mark.parametrize("gate,heads", [("prefill", "kv_group"), ("prefill", "query"), ("decode", "kv_group")])
def test_a_gate_on_a_head_shard_equals_the_whole_gate_on_those_heads(gate, heads):
    """Head-sharded attention (TP, Ulysses): shard i of 2 sees query heads [2i, 2i+2) and kv head i."""
    model = tiny_llama()
    module = AttentionGate(q_heads=4, kv_heads=2, head_dim=16, block_size=16, gate=gate, heads=heads)
    q, k = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16)
    whole = module(q, k, model.model.rotary_emb)
    per_shard = whole.shape[1] // 2
    for index in range(2):
        shard = copy.deepcopy(module)
        shard.shard_heads(index, 2)
        part = shard(q[:, 2 * index:2 * index + 2], k[:, index:index + 1], model.model.rotary_emb)
        torch.testing.assert_close(part, whole[:, index * per_shard:(index + 1) * per_shard])
    with pytest.raises(ValueError, match="gate expects 2 query and 1 kv heads per rank"):
        shard(q, k, model.model.rotary_emb)
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by 4"):
        shard.shard_heads(0, 2)           # refines shard 1 of 2 into 2 of 4: too many for 2 kv heads


def test_head_shards_compose_tensor_parallel_then_ulysses():
    module = AttentionGate(q_heads=8, kv_heads=4, head_dim=16, block_size=16)
    module.shard_heads(1, 2)        # TP rank 1 of 2: heads 4-7
    module.shard_heads(1, 2)        # Ulysses rank 1 of 2 within it: heads 6-7
    assert module.head_shard == (3, 4)


def test_selection_keeps_forced_blocks_and_equal_budgets_give_equal_sparsity():
    scores = torch.rand(2, 3, 9, 9)
    masks = [select.topk_mask(scores, 0.3), select.topk_mask(torch.rand(2, 3, 9, 9), 0.3),
             select.a_shape_mask(2, 3, 9, 0.3)]
    for mask in masks:
        assert mask[..., :, 0].all() and mask.diagonal(dim1=-2, dim2=-1).all()
        assert not (mask & ~select.causal_blocks(9)).any()
    assert len({round(select.sparsity(m), 9) for m in masks}) == 1 and select.sparsity(masks[0]) > 0.4
    assert select.sparsity(select.threshold_mask(torch.full((1, 1, 4, 4), 1.0), 0.5)) == 0.0


def test_decode_target_equals_float64_block_sums():
    q, k = torch.randn(1, 4, 37, 16), torch.randn(1, 2, 37, 16)
    target = select.decode_target_torch(q, k, 16, 0.25, gate_heads=2, query_chunk=7)
    scores = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    probs = scores.masked_fill(~torch.ones(37, 37, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    sums = torch.stack([probs[..., i * 16:(i + 1) * 16].sum(-1) for i in range(3)], -1)
    torch.testing.assert_close(target.double(), sums.unflatten(1, (2, 2)).mean(2), atol=1e-5, rtol=0)


def test_sparse_modes_at_full_density_equal_dense_and_train_mode_reports_kl():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 100))
    dense = model(input_ids=ids).logits
    control = attach_gates(model, block_size=16, use_triton="never")
    for mode in ("dense", "topk", "oracle", "static"):
        control.mode, control.density = mode, 1.0
        torch.testing.assert_close(model(input_ids=ids).logits, dense, atol=2e-4, rtol=0, msg=mode)
    control.mode, control.density = "static", 0.3
    sparse = model(input_ids=ids).logits
    assert control.layer_sparsity[0] > 0.2 and not torch.allclose(sparse, dense, atol=1e-3)
    control.mode = "train"
    torch.testing.assert_close(model(input_ids=ids).logits, dense, atol=2e-4, rtol=0)
    assert sorted(control.layer_kl) == [0, 1] and all(kl.requires_grad and kl > 0 for kl in control.layer_kl.values())
    detach_gates(model)
    torch.testing.assert_close(model(input_ids=ids).logits, dense, atol=2e-4, rtol=0)


def test_decode_gate_trains_against_the_block_summed_target():
    model = tiny_llama()
    control = attach_gates(model, block_size=16, gate="decode", use_triton="never")
    control.mode = "train"
    model(input_ids=torch.randint(0, 128, (1, 50)))
    loss = torch.stack(list(control.layer_kl.values())).mean()
    loss.backward()
    gate = find_attention_layers(model)[0].seer_gate
    assert gate.q_proj.weight.shape == (2, 2 * 16, 16)          # the GQA group's 2 query heads, unpooled
    assert gate.q_proj.weight.grad is not None and gate.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "seer_gate" not in n)


def test_gate_checkpoint_roundtrip_and_refuses_another_model(tmp_path):
    model = tiny_llama()
    attach_gates(model, block_size=16)
    save_gates(model, tmp_path / "gates")
    config = json.loads((tmp_path / "gates" / "gate_config.json").read_text())
    assert config["model"]["num_layers"] == 2 and config["gate"]["block_size"] == 16
    other = tiny_llama(seed=1)
    load_gates(other, tmp_path / "gates")
    for a, b in zip(find_attention_layers(model), find_attention_layers(other)):
        torch.testing.assert_close(a.seer_gate.q_proj.weight, b.seer_gate.q_proj.weight)
    with pytest.raises(ValueError, match="num_layers=2, but this model has num_layers=3"):
        load_gates(tiny_llama(layers=3), tmp_path / "gates")
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        load_gates(tiny_llama(heads=2, kv_heads=2, hidden=32), tmp_path / "gates")
    with pytest.raises(ValueError, match="block_size=16, but block_size=64 was requested"):
        load_gates(tiny_llama(), tmp_path / "gates", block_size=64)
    with pytest.raises(FileNotFoundError, match="not a gate checkpoint"):
        load_gates(tiny_llama(), tmp_path)


def test_bad_models_and_short_sequences_give_clear_errors(tiny_overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="could not find attention layers"):
        attach_gates(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))
    with pytest.raises(ValueError, match="head_dim=20, which the attention kernels do not support"):
        attach_gates(tiny_llama(hidden=80, heads=4, kv_heads=2))
    with pytest.raises(ValueError, match="block_size=48 is not supported"):
        attach_gates(tiny_llama(), block_size=48)
    from lowbit.train.run import run
    with pytest.raises(ValueError, match=r"data.seq_len=8 is shorter than one gate block \(objective.seer.block_size=16\)"):
        run(compose(tiny_overrides + ["objective=seer_gate", "data.seq_len=8", "objective.seer.block_size=16",
                                      "trainer.max_steps=1"]))


@pytest.mark.slow
def test_training_lowers_the_gate_loss_keeps_base_weights_and_exports_gates(tiny_overrides, tmp_path):
    """A real run on llama_tiny: gate KL on fixed batches drops; the base weights hash is unchanged."""
    from transformers import AutoModelForCausalLM

    from lowbit.models.load import load
    from lowbit.objectives.seer_checkpoint import read_gate_config
    from lowbit.train.run import run

    extra = ["objective=seer_gate", "objective.seer.block_size=16", "+model.config.initializer_range=0.3",
             "optim.lr=1e-2", "optim.weight_decay=0.0", "trainer.max_steps=24", "trainer.eval_every=-1",
             "trainer.save_every=-1", "trainer.eval_at_start=false", "objective.seer.use_triton=never"]
    cfg = compose(tiny_overrides + extra)
    fresh, _ = load(cfg.model, seed=cfg.trainer.seed)
    digest = base_weights_digest(fresh)
    run(cfg)
    run_dir = tmp_path / "run"
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    assert base_weights_digest(exported) == digest                      # the base model never changed
    from safetensors import safe_open
    with safe_open(str(run_dir / "export" / "model.safetensors"), framework="pt") as files:
        assert not [key for key in files.keys() if "seer_gate" in key]  # gates go to gates/, not the HF export
    assert read_gate_config(run_dir / "gates")["gate"]["block_size"] == 16
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "seer/kl" in r][-1]
    for key in ("seer/sparsity_at_threshold", "seer/layer_00/kl", "seer/layer_01/sparsity"):
        assert key in last, key

    torch.manual_seed(0)
    batches = [torch.randint(0, 2000, (2, 64)) for _ in range(3)]

    def mean_kl(model):
        control = model.seer_controller
        total = 0.0
        for ids in batches:
            control.mode = "train"
            with torch.no_grad():
                model(input_ids=ids)
            total += torch.stack(list(control.layer_kl.values())).mean().item()
        return total / len(batches)

    trained, untrained = load(cfg.model, seed=cfg.trainer.seed)[0], load(cfg.model, seed=cfg.trainer.seed)[0]
    load_gates(trained, run_dir / "gates")
    torch.manual_seed(cfg.trainer.seed)
    attach_gates(untrained, block_size=16)
    assert mean_kl(trained) < 0.7 * mean_kl(untrained), (mean_kl(trained), mean_kl(untrained))
    assert math.isfinite(mean_kl(trained))

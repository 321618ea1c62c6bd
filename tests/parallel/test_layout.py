"""Bad parallel layouts fail with the value and the fix, before any process-group work."""
from types import SimpleNamespace

import pytest
import torch.distributed as dist
from transformers import LlamaConfig

from lowbit.config import ParallelConfig
from lowbit.parallel import init, mesh
from lowbit.parallel.mesh import check_model, layout_for

LLAMA = LlamaConfig(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)


def test_layout_splits_world_into_dp_ulysses_tp():
    layout = layout_for(ParallelConfig(tp=2, dp_shard=2), world_size=4)
    assert (layout.dp, layout.ulysses, layout.tp) == (2, 1, 2)
    assert [layout.coordinates(r) for r in range(4)] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]
    layout = layout_for(ParallelConfig(ulysses=2), world_size=4)
    assert (layout.dp, layout.ulysses) == (2, 2) and layout.coordinates(3) == (1, 1, 0) and not layout.fsdp
    # TP with other ranks: FSDP2 over them (DDP does not take DTensor parameters), also for Ulysses ranks
    assert layout_for(ParallelConfig(tp=2), world_size=4).fsdp
    layout = layout_for(ParallelConfig(tp=2, ulysses=2), world_size=4)
    assert (layout.dp, layout.ulysses, layout.tp, layout.fsdp) == (1, 2, 2, True)
    assert layout.coordinates(3) == (0, 1, 1)
    assert not layout_for(ParallelConfig(tp=2), world_size=2).fsdp


@pytest.mark.parametrize("cfg, world, message", [
    (ParallelConfig(tp=3), 4, "does not divide the world size 4"),
    (ParallelConfig(ulysses=3), 2, "does not divide the world size 2"),
    (ParallelConfig(tp=0), 2, "parallel.tp=0 must be >= 1"),
    (ParallelConfig(dp_shard=4), 2, "set parallel.dp_shard=2"),
    (ParallelConfig(sp=True), 2, "needs parallel.tp>1"),
    (ParallelConfig(data_parallel="zero"), 2, "'zero' is not known"),
    (ParallelConfig(dp_shard=2, fsdp_param_dtype="float16"), 2, r"fsdp_param_dtype='float16' is not supported; use "
                                                                r"one of \['float32', 'bfloat16'\]"),
    (ParallelConfig(dp_shard=2, fsdp_reduce_dtype="fp32"), 2, "fsdp_reduce_dtype='fp32' is not supported"),
    # FSDP2's options where FSDP2 does not run (DDP, one process) would do nothing: refused, not ignored
    (ParallelConfig(fsdp_param_dtype="bfloat16"), 2, "parallel.fsdp_param_dtype=bfloat16: options of FSDP2, which this "
                                                    "layout does not use .* set parallel.dp_shard"),
    (ParallelConfig(fsdp_reshard_after_forward=False), 1, "fsdp_reshard_after_forward=False: options of FSDP2"),
    (ParallelConfig(fsdp_reduce_every_micro_batch=False), 2, "fsdp_reduce_every_micro_batch=False: options of FSDP2"),
    (ParallelConfig(fsdp_fp8_all_gather=True), 2, "fsdp_fp8_all_gather=True: options of FSDP2"),
    (ParallelConfig(tp=2, fsdp_fp8_all_gather=True), 4, "does not combine with tensor parallelism .*parallel.tp=2"),
])
def test_bad_mesh_is_refused(cfg, world, message):
    with pytest.raises(ValueError, match=message):
        layout_for(cfg, world)


def test_fsdp2_options_pass_where_fsdp2_runs():
    assert layout_for(ParallelConfig(dp_shard=2, fsdp_param_dtype="bfloat16", fsdp_reduce_dtype="bfloat16",
                                     fsdp_reshard_after_forward=False, fsdp_reduce_every_micro_batch=False),
                      world_size=2).fsdp
    assert layout_for(ParallelConfig(tp=2, fsdp_param_dtype="bfloat16"), world_size=4).fsdp    # TP x FSDP2


def test_deepspeed_missing_is_refused(monkeypatch):
    monkeypatch.setattr(mesh, "deepspeed_installed", lambda: False)
    with pytest.raises(ImportError, match="pip install deepspeed"):
        layout_for(ParallelConfig(data_parallel="deepspeed"), 2)


@pytest.mark.parametrize("cfg, seq_len, message", [
    (ParallelConfig(tp=8), 64, "num_attention_heads=4"),
    (ParallelConfig(tp=4), 64, "num_key_value_heads=2"),
    (ParallelConfig(ulysses=4), 64, "num_key_value_heads=2"),
    (ParallelConfig(ulysses=2), 63, "data.seq_len=63 is not divisible by parallel.ulysses=2"),
    (ParallelConfig(tp=2, sp=True), 65, "data.seq_len=65"),
    (ParallelConfig(tp=2, ulysses=2), 64, "4 does not divide the model's num_key_value_heads=2"),
])
def test_degree_not_dividing_the_model_is_refused(cfg, seq_len, message):
    with pytest.raises(ValueError, match=message):
        check_model(LLAMA, cfg, seq_len)


def test_hidden_size_must_divide():
    # A config with 4 heads of width 16.5 does not exist in HF; the check reads only these fields.
    config = SimpleNamespace(hidden_size=66, intermediate_size=192, num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(ValueError, match="hidden_size=66"):
        check_model(config, ParallelConfig(tp=4), 64)


def test_good_degrees_pass():
    check_model(LLAMA, ParallelConfig(tp=2, sp=True), 64)
    check_model(LLAMA, ParallelConfig(ulysses=2), 64)


def test_init_refuses_before_joining_a_process_group(monkeypatch):
    # As rank 0 of 4: a valid layout would block in init_process_group waiting for the others.
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="parallel.tp=3"):
        init(ParallelConfig(tp=3))
    assert not dist.is_initialized()


def test_tp_with_ulysses_needs_whole_heads_and_sequence_shards_per_rank():
    config = LlamaConfig(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=4)
    check_model(config, ParallelConfig(tp=2, ulysses=2, sp=True), 64)
    with pytest.raises(ValueError, match="data.seq_len=66 is not divisible by parallel.ulysses x parallel.tp"):
        check_model(config, ParallelConfig(tp=2, ulysses=2, sp=True), 66)



@pytest.mark.parametrize("recipe, found", [("", "no quantized linears"), ("fp8_rowwise", r"\['fp8_rowwise'\]")])
def test_fp8_all_gather_without_an_fp8_tensorwise_linear_is_refused(recipe, found):
    """parallel.fsdp_fp8_all_gather on a model with nothing to gather in FP8 fails before sharding, naming what the
    model has and the fix."""
    from lowbit.precision.fp8_gather import wrap_fp8_weights
    from tests.parallel.equivalence_worker import tiny_llama

    with pytest.raises(ValueError, match=f"needs linears in fp8 tensorwise .* this model has {found}. Set "
                                         f"precision=fp8_tensorwise or parallel.fsdp_fp8_all_gather=false"):
        wrap_fp8_weights(tiny_llama(recipe))

"""Activation offload hooks: every saved tensor comes back bit-exactly; layers train as without offload."""
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.config import MemoryConfig
from lowbit.memory import apply
from lowbit.memory.offload import ActivationOffloader, OffloadedTensor, is_dense

TINY_LLAMA = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, use_cache=False)


def tiny_llama(memory: MemoryConfig | None = None, dtype=torch.float32):
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY_LLAMA).to(dtype)
    if memory is not None:
        apply(model, memory)
    return model


def loss_and_grads(model, input_ids):
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_every_saved_tensor_is_restored_bit_exactly():
    """The real hooks, wrapped only to record what autograd saved and what it got back."""
    offloader = ActivationOffloader(torch.device("cpu"), min_bytes=0)
    pairs = []

    def pack(tensor):
        packed = offloader.pack(tensor)
        return tensor.detach().clone(), tensor.stride(), packed

    def unpack(record):
        original, stride, packed = record
        restored = offloader.unpack(packed)
        pairs.append((original, stride, restored, isinstance(packed, OffloadedTensor)))
        return restored

    model = tiny_llama(dtype=torch.bfloat16)
    input_ids = torch.randint(0, 300, (2, 17))
    offloader.begin_layer()
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
        (x.t() @ torch.randn(5, 3, dtype=torch.float64)).sum().backward()   # a transposed (strided) save
    loss.backward()
    offloaded = [p for p in pairs if p[3]]
    assert len(offloaded) > 20 and not offloader.waiting
    assert {p[0].dtype for p in offloaded} >= {torch.bfloat16, torch.float64}
    assert any(not p[0].is_contiguous() for p in offloaded)
    for original, stride, restored, _ in pairs:
        assert restored.dtype == original.dtype and restored.shape == original.shape
        assert restored.stride() == stride
        assert torch.equal(restored, original) or (original.isnan().any() and torch.equal(
            restored.nan_to_num(), original.nan_to_num()))


def test_small_and_gapped_tensors_stay_put():
    offloader = ActivationOffloader(torch.device("cpu"), min_bytes=1024)
    offloader.begin_layer()
    small = torch.randn(10)
    assert offloader.pack(small) is small
    big = torch.randn(64, 64)
    gapped = big[:, :10]
    assert not is_dense(gapped) and offloader.pack(gapped) is gapped
    assert is_dense(big.t()) and isinstance(offloader.pack(big.t()), OffloadedTensor)
    weight = torch.nn.Parameter(torch.randn(64, 64))
    assert offloader.pack(weight) is weight


@pytest.mark.parametrize("memory", [
    MemoryConfig(offload=True, offload_min_bytes=0),
    MemoryConfig(offload=True, offload_min_bytes=4096, offload_layers=["model.layers.1", "model.layers.2"]),
    MemoryConfig(checkpointing="full"),
    MemoryConfig(checkpointing="selective"),
    MemoryConfig(checkpointing="selective", checkpoint_layers=["model.layers.0"], offload=True, offload_min_bytes=0,
                 offload_layers=["model.layers.[12]"]),
], ids=["offload", "offload-some", "full", "selective", "selective+offload"])
def test_gradients_match_training_without_memory_savers(memory):
    input_ids = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(3))
    expected_loss, expected = loss_and_grads(tiny_llama(), input_ids)
    model = tiny_llama(memory)
    loss, grads = loss_and_grads(model, input_ids)
    assert torch.equal(loss, expected_loss)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    if memory.offload:
        assert model._lowbit_offloader.bytes_offloaded > 0 and not model._lowbit_offloader.waiting
        if memory.checkpointing == "none" and memory.offload_min_bytes == 0:
            assert all(torch.equal(g, w) for g, w in zip(grads, expected))   # offload alone is bit-exact
    model.eval()
    with torch.no_grad():                      # evaluation passes through untouched
        assert torch.equal(model(input_ids=input_ids).logits, tiny_llama()(input_ids=input_ids).logits)


def test_bad_memory_settings_name_the_value_and_the_fix(caplog):
    with pytest.raises(ValueError, match="none, full, selective|'none', 'full', 'selective'"):
        tiny_llama(MemoryConfig(checkpointing="sometimes"))
    with pytest.raises(ValueError, match="matches no decoder layer"):
        tiny_llama(MemoryConfig(offload=True, offload_layers=["decoder.*"]))
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        tiny_llama(MemoryConfig(offload=True))
    assert "on a model on the CPU" in caplog.text and "pinned host memory" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, side stream)")
def test_cuda_offload_is_bit_exact_and_lowers_peak_memory():
    """memory.apply on the CPU model, then .cuda(), as tiny_llama does: the offloader moves to the GPU with it (it
    had stayed a CPU-only no-op, 2026-12-02 on an H200: the peak memory check failed)."""
    input_ids = torch.randint(0, 300, (8, 128), device="cuda")

    def measure(memory):
        model = tiny_llama(memory).cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss, grads = loss_and_grads(model, input_ids)
        torch.cuda.synchronize()
        return loss, grads, torch.cuda.max_memory_allocated() - before

    loss0, grads0, peak0 = measure(None)
    loss1, grads1, peak1 = measure(MemoryConfig(offload=True, offload_min_bytes=0))
    assert torch.equal(loss0, loss1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert peak1 < peak0


def test_backward_prefetches_exactly_one_layer_ahead():
    """At every unpack, at most two layers are back on the device: the one in backward and the next one."""
    model = tiny_llama(MemoryConfig(offload=True, offload_min_bytes=0))
    offloader = model._lowbit_offloader
    handles, worst = [], [0]
    pack, unpack = offloader.pack, offloader.unpack

    def recording_pack(tensor):
        packed = pack(tensor)
        if isinstance(packed, OffloadedTensor):
            handles.append(packed)
        return packed

    def checking_unpack(packed):
        restored = unpack(packed)
        worst[0] = max(worst[0], len({h.layer_call for h in handles if h.fetched is not None}))
        return restored

    offloader.pack, offloader.unpack = recording_pack, checking_unpack
    input_ids = torch.randint(0, 300, (2, 33))
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert len({h.layer_call for h in handles}) == TINY_LLAMA.num_hidden_layers
    assert 1 <= worst[0] <= 2

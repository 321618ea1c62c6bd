"""Checkpointing policies recompute what they say: full re-runs the layer's matmuls, selective none of them."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.config import MemoryConfig
from lowbit.memory import apply

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, use_cache=False)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def backward_ops(checkpointing: str) -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    apply(model, MemoryConfig(checkpointing=checkpointing))
    input_ids = torch.randint(0, 300, (2, 17))
    loss = model(input_ids=input_ids, labels=input_ids).loss
    with CountOps() as counter:
        loss.backward()
    return counter.counts


def test_full_recomputes_matmuls_and_selective_only_element_wise_work():
    none, full, selective = backward_ops("none"), backward_ops("full"), backward_ops("selective")
    matmuls = lambda counts: counts.get("mm", 0) + counts.get("addmm", 0) + counts.get("bmm", 0)
    # `full` recomputes q, k, v, o, gate, up per layer (down's output is not needed: PyTorch's recompute
    # stops early once every saved tensor is back); `selective` recomputes none of them
    assert matmuls(full) == matmuls(none) + 2 * 6
    assert matmuls(selective) == matmuls(none)
    # selective still recomputes element-wise work (the SiLU, the RMSNorm's rsqrt) that `none` kept
    assert selective.get("silu", 0) > none.get("silu", 0)
    assert selective.get("rsqrt", 0) > none.get("rsqrt", 0)

"""Run under `torchrun --nproc_per_node=2`: a tiny HF Llama sharded by one layout vs the same model in
one process. Prints one JSON line per check on rank 0; exits non-zero on a mismatch.

usage: equivalence_worker.py MODE[,MODE...] [seq_len]     MODE: tp | tp_sp | ulysses
"""
from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.parallel.tensor import apply_tensor_parallel, loss_context, to_local
from lowbit.parallel.ulysses import apply_ulysses

RTOL = 1e-5


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config).float()


def mean_nll(logits, input_ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def to_local_shape(x: torch.Tensor) -> torch.Size:
    return x.to_local().shape if isinstance(x, torch.distributed.tensor.DTensor) else x.shape


def main() -> None:
    modes = sys.argv[1].split(",")
    seq_len = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    dist.init_process_group("gloo")
    failures = [compare(mode, seq_len) for mode in modes]
    dist.destroy_process_group()
    failures = [f for f in failures if f]
    if failures:
        sys.exit("\n".join(failures))


def compare(mode: str, seq_len: int) -> str:
    """Logits, loss and every parameter's gradient of `mode` vs one process; '' or the failure."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    input_ids = torch.randint(0, 96, (2, seq_len))
    reference = tiny_llama()
    model = copy.deepcopy(reference)
    ref_logits = reference(input_ids=input_ids).logits
    ref_loss = mean_nll(ref_logits, input_ids)
    ref_loss.backward()

    tensor_parallel = mode.startswith("tp")
    if tensor_parallel:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        model = apply_tensor_parallel(model, mesh, sequence_parallel=mode == "tp_sp")
    else:
        group = dist.new_group(list(range(world)))
        model = apply_ulysses(model, group)
    seen = []   # the residual stream entering layer 0: sharded along the sequence under SP and Ulysses
    layer0 = (model.module if hasattr(model, "module") else model).model.layers[0]
    layer0.register_forward_pre_hook(lambda module, args: seen.append(tuple(to_local_shape(args[0]))))
    with loss_context(tensor_parallel):
        logits = model(input_ids=input_ids).logits
    expected = seq_len // world if mode in ("tp_sp", "ulysses") else seq_len
    assert seen[0][1] == expected, f"{mode}: layer 0 saw {seen[0]}, expected {expected} positions per rank"
    with loss_context(tensor_parallel):
        loss = mean_nll(logits, input_ids)
        loss.backward()
    results = {"mode": mode, "logits": relative_error(to_local(logits.detach()), ref_logits.detach()),
               "loss": relative_error(to_local(loss.detach()), ref_loss.detach())}
    worst = ("", 0.0)
    base = model.module if hasattr(model, "module") else model
    ref_params = dict(reference.named_parameters())
    for name, param in base.named_parameters():
        grad = param.grad
        if isinstance(grad, torch.distributed.tensor.DTensor):
            grad = grad.full_tensor()
        elif not tensor_parallel:   # Ulysses: replicas see sequence shards; DDP's mean over the group
            grad = grad.clone()
            dist.all_reduce(grad)
            grad /= world
        error = relative_error(grad, ref_params[name].grad)
        if error >= worst[1]:
            worst = (name, error)
    results["grad"], results["worst_grad"] = worst[1], worst[0]
    if rank == 0:
        print(json.dumps(results), flush=True)
    if max(results["logits"], results["loss"], results["grad"]) > RTOL:
        return f"{mode}: mismatch beyond {RTOL}: {results}"
    return ""


if __name__ == "__main__":
    main()

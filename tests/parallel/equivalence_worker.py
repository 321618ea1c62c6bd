"""Run under `torchrun --nproc_per_node=2`: a tiny HF Llama sharded by one layout vs the same model in
one process. Prints one JSON line per check on rank 0; exits non-zero on a mismatch.

usage: equivalence_worker.py MODE[,MODE...] [seq_len]     MODE: LAYOUT[@RECIPE[+dge][+occ][+token][+delayed]]
  LAYOUT: tp | tp_sp | ulysses | ulysses_nll (the loss from each rank's shard) | linear;  RECIPE: a precision recipe (fp8_rowwise, nvfp4, ...): both models
  get lowbit's quantized linears, and the sharded one must quantize exactly as the single process does.
  `linear` checks one QuantLinear, column- and row-parallel, on the very same input: every quantized
  value matches bit for bit, so outputs and gradients differ by float32 summation order alone. (In a whole
  model, a 1-ulp difference of a shard's GEMM reaches the next quantizer; with OCC's clamp it can move
  an FP4 scale, so OCC is checked here, layer by layer.)
  Whole quantized models: logits, loss and the median gradient to RTOL; the worst gradient to QUANT_RTOL, since a
  1-ulp difference from the row-parallel all-reduce can carry one operand value across an FP8/FP4 rounding
  boundary in the next layer (seen with transformers 5.24's initial weights: layer 0's up_proj gradient 2.4e-5,
  every other parameter <= 1.4e-6). A sharding bug moves every layer, which the median catches.
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
QUANT_RTOL = 1e-3


def precision_config(recipe: str, **fields):
    """PrecisionConfig of 'NAME[+dge][+occ][+token]' (block 16, so that every shard holds whole blocks)."""
    from lowbit.config import PrecisionConfig

    name, *options = recipe.split("+")
    return PrecisionConfig(recipe=name, block_size=16, dge="dge" in options, occ="occ" in options,
                           occ_scope="token" if "token" in options else "tensor", **fields)


def tiny_llama(recipe: str = "") -> LlamaForCausalLM:
    """A 2-layer Llama; with a recipe (precision_config) its decoder linears are lowbit's QuantLinear.
    Quantized models are wider, so that every shard holds whole 16-element blocks (fp8_blockwise at
    block 16, NVFP4)."""
    torch.manual_seed(0)
    hidden = 64 if recipe else 32
    config = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).float()
    if recipe:
        from lowbit.precision import apply
        model = apply(model, precision_config(recipe))
    return model


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
    failures = [compare_linear(mode.partition("@")[2]) if mode.startswith("linear@") else compare(mode, seq_len)
                for mode in modes]
    dist.destroy_process_group()
    failures = [f for f in failures if f]
    if failures:
        sys.exit("\n".join(failures))


def compare_linear(recipe: str) -> str:
    """One QuantLinear [128 x 64], column- and row-parallel, vs the same layer in one process: output, dx,
    dW and db on the same random input (32 tokens, a few outliers for OCC to clamp).
    '+delayed' (fp8_tensorwise, precision.scaling=delayed): two passes, one recording, one delayed on a larger
    input (some values saturate); each pass's output, the accumulated gradients, and the recorded amax history
    (exactly: a record under TP is the maximum over the layer's shards, the fold the maximum over ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lowbit.precision import apply
    from lowbit.precision.delayed import install

    rank, world = dist.get_rank(), dist.get_world_size()
    name, *options = recipe.split("+")
    delayed = "delayed" in options
    cfg = precision_config("+".join([name] + [o for o in options if o != "delayed"]), include=["*"], exclude=[])
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    failures = []
    for layout, style in (("colwise", ColwiseParallel(use_local_output=False)),
                          ("rowwise", RowwiseParallel(use_local_output=False))):
        torch.manual_seed(2)
        reference = apply(torch.nn.Sequential(torch.nn.Linear(64, 128, bias=layout == "colwise")), cfg)
        sharded = parallelize_module(copy.deepcopy(reference), mesh, {"0": style})
        sharded[0].prepare_tensor_parallel()
        if delayed:
            states = install(reference, 16), install(sharded, 16)
        shard = 64 // world
        x = torch.randn(32, 64)
        x[torch.randint(0, 32, (6,)), torch.randint(0, 64, (6,))] *= 40.0        # outliers
        x_ref = x.clone().requires_grad_()
        x_in = (x if layout == "colwise" else x[:, rank * shard:(rank + 1) * shard]).clone().requires_grad_()
        errors = {}
        for index, factor in enumerate((1.0, 1.5) if delayed else (1.0,)):        # record, then delayed
            dy = torch.randn(32, 128) * factor
            y_ref = reference(x_ref * factor)
            y_ref.backward(dy)
            y = sharded(x_in * factor)
            y.backward(DTensor.from_local(dy, mesh, (Replicate(),)).redistribute(mesh, y.placements))
            errors[f"y{index}" if delayed else "y"] = relative_error(y.full_tensor().detach(), y_ref.detach())
        dx = x_in.grad if layout == "colwise" else DTensor.from_local(x_in.grad, mesh, (Shard(1),)).full_tensor()
        errors.update({"dx": relative_error(dx, x_ref.grad),
                       "dW": relative_error(sharded[0].weight.grad.full_tensor(), reference[0].weight.grad)})
        if reference[0].bias is not None:
            errors["db"] = relative_error(sharded[0].bias.grad.full_tensor(), reference[0].bias.grad)
        if delayed:
            for state in states:
                state.fold()
            assert states[0].slot == states[1].slot == 1 and states[1].mode == "delayed", [s.slot for s in states]
            errors["history"] = relative_error(states[1].history, states[0].history)
        row = {"mode": f"linear@{recipe}", "layout": layout, **errors}
        if rank == 0:
            print(json.dumps(row), flush=True)
        if max(errors.values()) > RTOL or (delayed and errors["history"] != 0.0):
            failures.append(f"linear@{recipe} {layout}: mismatch beyond {RTOL}: {row}")
    return "\n".join(failures)


def compare(mode: str, seq_len: int) -> str:
    """Logits, loss and every parameter's gradient of `mode` vs one process; '' or the failure."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    input_ids = torch.randint(0, 96, (2, seq_len))
    mode, _, recipe = mode.partition("@")
    reference = tiny_llama(recipe)
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
    if mode == "ulysses_nll":   # the LM loss scored on each rank's shard, the logits never gathered
        from lowbit.objectives.base import next_token_nll
        nll, count = next_token_nll(model, input_ids)
        loss = nll / count
        loss.backward()
        logits = ref_logits
    else:
        with loss_context(tensor_parallel):
            logits = model(input_ids=input_ids).logits
        with loss_context(tensor_parallel):
            loss = mean_nll(logits, input_ids)
            loss.backward()
    expected = seq_len // world if mode in ("tp_sp", "ulysses", "ulysses_nll") else seq_len
    assert seen[0][1] == expected, f"{mode}: layer 0 saw {seen[0]}, expected {expected} positions per rank"
    results = {"mode": f"{mode}@{recipe}" if recipe else mode,
               "logits": relative_error(to_local(logits.detach()), ref_logits.detach()),
               "loss": relative_error(to_local(loss.detach()), ref_loss.detach())}
    worst, errors = ("", 0.0), []
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
        if os.environ.get("EQ_DEBUG") and rank == 0:
            print(name, error, flush=True)
        errors.append(error)
        if error >= worst[1]:
            worst = (name, error)
    results["grad"], results["worst_grad"] = worst[1], worst[0]
    results["grad_median"] = sorted(errors)[len(errors) // 2]
    if rank == 0:
        print(json.dumps(results), flush=True)
    worst_tolerance = QUANT_RTOL if recipe else RTOL
    if max(results["logits"], results["loss"], results["grad_median"]) > RTOL or results["grad"] > worst_tolerance:
        return f"{results['mode']}: mismatch beyond {RTOL} (worst gradient: {worst_tolerance}): {results}"
    return ""


if __name__ == "__main__":
    main()

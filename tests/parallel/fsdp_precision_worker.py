"""Run under `torchrun --nproc_per_node=2`: FSDP2 with mixed precision and its other options (parallel.fsdp_param_dtype
/ fsdp_reduce_dtype / fsdp_reshard_after_forward / fsdp_reduce_every_micro_batch, lowbit.parallel.fsdp.apply_fsdp2)
against one process that does by hand what the options promise. Each rank takes half of a batch in two micro-batches
(loss / 2 each, as the trainer scales them); the reference runs every (rank, micro-batch) through a copy of the model
whose parameters are rounded to the parameter dtype (buffers, such as RoPE's frequencies, untouched), rounds each
gradient to the reduce dtype, and averages over the ranks there: per micro-batch, summed in float32 (the default), or
once per step after summing the micro-batches (`accumulate`: no reduce-scatter before the step's last backward).
Prints one JSON line per case on rank 0; exits non-zero on a mismatch.

usage: fsdp_precision_worker.py CASE[,CASE...]     CASE: PARAM_DTYPE/REDUCE_DTYPE[/keep][/accumulate]   (keep: no
reshard after forward), e.g. bfloat16/float32,bfloat16/bfloat16/keep,float32/float32/accumulate; or fp8[/compiled]
[/bfloat16]: parallel.fsdp_fp8_all_gather (check_fp8_all_gather). WORKER_DEVICE=cuda: on two GPUs with NCCL (the
quantize kernels and FP8 GEMMs on the GPU), as bench/device_pending.sh fsdp2_precision runs it.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import operator
import os
import sys

import torch
import torch.distributed as dist

from tests.parallel.equivalence_worker import mean_nll, relative_error, tiny_llama

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RTOL = 1e-6
DEVICE = os.environ.get("WORKER_DEVICE", "cpu")     # cuda: NCCL, one GPU per rank (bench/device_pending.sh)


def rank_gradients(model, micro_batches, param_dtype, reduce_dtype) -> tuple[list[float], list[dict]]:
    """One rank's micro-batches in one process: (their losses, each one's gradients in the reduce dtype)."""
    losses, grads = [], []
    for ids in micro_batches:
        rounded = copy.deepcopy(model)
        for p in rounded.parameters():
            p.data = p.data.to(param_dtype)
        loss = mean_nll(rounded(input_ids=ids).logits, ids)
        (loss / len(micro_batches)).backward()
        losses.append(loss.item())
        grads.append({n: p.grad.to(reduce_dtype) for n, p in rounded.named_parameters()})
    return losses, grads


def reference(model, per_rank, param_dtype, reduce_dtype, accumulate: bool) -> tuple[list[float], dict]:
    """(every rank's micro-batch losses, the float32 gradient FSDP2 should leave on the sharded parameters)."""
    runs = [rank_gradients(model, micro_batches, param_dtype, reduce_dtype) for micro_batches in per_rank]
    losses = [loss for rank_losses, _ in runs for loss in rank_losses]
    names = runs[0][1][0].keys()
    if accumulate:      # each rank sums its micro-batches (in the reduce dtype), one average over the ranks
        sums = [{n: functools.reduce(operator.add, [g[n] for g in rank_grads]) for n in names} for _, rank_grads in runs]
        return losses, {n: ((sums[0][n] + sums[1][n]) / 2).float() for n in names}
    micro = range(len(runs[0][1]))     # one average over the ranks per micro-batch, summed in float32
    means = [{n: ((runs[0][1][j][n] + runs[1][1][j][n]) / 2).float() for n in names} for j in micro]
    return losses, {n: functools.reduce(operator.add, [m[n] for m in means]) for n in names}


def check(case: str) -> str:
    from torch.distributed.device_mesh import init_device_mesh

    from lowbit.parallel.fsdp import apply_fsdp2

    param_name, reduce_name, *flags = case.split("/")
    accumulate = "accumulate" in flags
    rank = dist.get_rank()
    model = tiny_llama().to(DEVICE)
    torch.manual_seed(1)
    batch = torch.randint(0, 96, (8, 16)).to(DEVICE)
    per_rank = [[batch[0:2], batch[2:4]], [batch[4:6], batch[6:8]]]
    want_losses, want_grads = reference(model, per_rank, DTYPES[param_name], DTYPES[reduce_name], accumulate)

    mesh = init_device_mesh(DEVICE, (dist.get_world_size(),), mesh_dim_names=("dp",))
    sharded = apply_fsdp2(copy.deepcopy(model), mesh, param_dtype=param_name, reduce_dtype=reduce_name,
                          reshard_after_forward="keep" not in flags, reduce_every_micro_batch=not accumulate)
    seen = set()
    sharded.model.layers[0].register_forward_pre_hook(
        lambda module, args: seen.update({p.dtype for p in module.parameters()} | {args[0].dtype}))
    losses, reduced_early = [], None
    for index, ids in enumerate(per_rank[rank]):
        last = index == len(per_rank[rank]) - 1
        no_sync = getattr(sharded, "no_sync", None)          # as the trainer runs it
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            loss = mean_nll(sharded(input_ids=ids).logits, ids)
            (loss / len(per_rank[rank])).backward()
        losses.append(loss.detach())
        if index == 0:      # reduced after the first micro-batch: a gradient on the sharded parameters already
            reduced_early = all(p.grad is not None for p in sharded.parameters())
    gathered = [torch.zeros(len(losses), device=DEVICE) for _ in range(2)]
    dist.all_gather(gathered, torch.stack(losses))
    got_losses = torch.cat(gathered).tolist()
    errors = {"loss": max(abs(got - want) / abs(want) for got, want in zip(got_losses, want_losses))}
    errors["gradient"] = max(relative_error(p.grad.full_tensor(), want_grads[n]) for n, p in sharded.named_parameters())
    dtypes = {"compute": sorted(str(d) for d in seen),
              "master": sorted({str(p.dtype) for p in sharded.parameters()}),
              "grad": sorted({str(p.grad.dtype) for p in sharded.parameters()})}
    row = {"case": case, **errors, **dtypes, "reduced_after_first_micro_batch": reduced_early}
    if rank == 0:
        print(json.dumps(row), flush=True)
    wrong = dtypes != {"compute": [str(DTYPES[param_name])], "master": ["torch.float32"], "grad": ["torch.float32"]}
    if max(errors.values()) > RTOL or wrong or reduced_early == accumulate:
        return f"{case}: beyond {RTOL}, unexpected dtypes or reduce-scatter timing: {row}"
    return ""


def check_fp8_all_gather(case: str) -> str:
    """`fp8[/compiled][/bfloat16]`: a 2-layer Llama with fp8 tensorwise linears under FSDP2, three AdamW steps with
    parallel.fsdp_fp8_all_gather against the same without it, two micro-batches per step: losses, gradients and
    parameters bit for bit (eager, or each decoder layer compiled with aot_eager). The all-gather input of each linear
    weight is its shard in E4M3, one byte per parameter, quantized once per step for its four gathers, and the
    linears see the gathered E4M3 weight. `bfloat16`: with
    parallel.fsdp_param_dtype=bfloat16 the weights are still quantized from their float32 shards, so the runs differ
    by bfloat16's rounding elsewhere; held to 1e-2 of the loss."""
    from torch.distributed.device_mesh import init_device_mesh

    from lowbit.precision.fp8_gather import QUANTIZED_SHARDS, GatheredFP8Weight, ShardedFP8Weight
    from lowbit.parallel.fsdp import apply_fsdp2

    flags = case.split("/")[1:]
    rank = dist.get_rank()
    base = tiny_llama("fp8_tensorwise").to(DEVICE)
    torch.manual_seed(1)
    batch = torch.randint(0, 96, (4, 16)).to(DEVICE)
    mesh = init_device_mesh(DEVICE, (dist.get_world_size(),), mesh_dim_names=("dp",))
    runs = {}
    for fp8 in (False, True):
        torch._dynamo.reset()
        model = apply_fsdp2(copy.deepcopy(base), mesh, fp8_all_gather=fp8,
                            param_dtype="bfloat16" if fp8 and "bfloat16" in flags else "float32")
        if "compiled" in flags:
            for layer in model.model.layers:
                layer.compile(backend="aot_eager", dynamic=False)
        seen = []
        model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(type(m.weight)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses, grads = [], []
        quantized_before = QUANTIZED_SHARDS[0]
        for _ in range(3):
            for ids in batch[2 * rank:2 * rank + 1], batch[2 * rank + 1:2 * rank + 2]:     # two micro-batches
                loss = mean_nll(model(input_ids=ids).logits, ids)
                (loss / 2).backward()
                losses.append(loss.detach())
            grads.append({n: p.grad.full_tensor() for n, p in model.named_parameters()})
            optimizer.step()
            optimizer.zero_grad()
        params = {n: p.full_tensor() for n, p in model.named_parameters()}
        runs[fp8] = torch.stack(losses), grads, params, seen
        if fp8:
            wrapped = sum(isinstance(p.to_local(), ShardedFP8Weight) for p in model.parameters())
            quantized = QUANTIZED_SHARDS[0] - quantized_before
            local = model.model.layers[0].mlp.down_proj.weight.to_local()
            inputs, _ = local.fsdp_pre_all_gather(mesh, None, None, None, None)
            gather = {"wrapped": isinstance(local, ShardedFP8Weight), "input_dtype": str(inputs[0].dtype),
                      "bytes_per_parameter": inputs[0].numel() * inputs[0].element_size() / local.numel(),
                      "linear_sees": sorted({t.__name__ for t in seen}),
                      # 4 gathers per weight and step (2 micro-batches x forward, backward), 1 quantization
                      "quantized_per_weight_and_step": quantized / (3 * wrapped)}
    (want_losses, want_grads, want_params, _), (got_losses, got_grads, got_params, _) = runs[False], runs[True]
    if "bfloat16" in flags:
        errors = {"loss": (got_losses - want_losses).abs().max().item() / want_losses.abs().max().item()}
        tolerance = 1e-2
    else:
        errors = {"loss": relative_error(got_losses, want_losses),
                  "gradient": max(relative_error(g[n], w[n]) for g, w in zip(got_grads, want_grads) for n in w),
                  "parameter": max(relative_error(got_params[n], want_params[n]) for n in want_params)}
        tolerance = 0.0
    row = {"case": case, **errors, **gather}
    if rank == 0:
        print(json.dumps(row), flush=True)
    if max(errors.values()) > tolerance or gather != {"wrapped": True, "input_dtype": "torch.uint8",
                                                      "bytes_per_parameter": 1.0,
                                                      "linear_sees": [GatheredFP8Weight.__name__],
                                                      "quantized_per_weight_and_step": 1.0}:
        return f"{case}: beyond {tolerance} or not gathered in E4M3: {row}"
    return ""


def main() -> None:
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    failures = [f for f in (check_fp8_all_gather(c) if c.startswith("fp8") else check(c)
                            for c in sys.argv[1].split(",")) if f]
    dist.destroy_process_group()
    if failures:
        sys.exit("\n".join(failures))


if __name__ == "__main__":
    main()

"""Run under `torchrun --nproc_per_node=2`: FSDP2 with mixed precision (parallel.fsdp_param_dtype /
fsdp_reduce_dtype / fsdp_reshard_after_forward, lowbit.parallel.fsdp.apply_fsdp2) against one process that does by
hand what the policy promises: each rank's half of the batch through a copy of the model whose parameters are rounded
to the parameter dtype (buffers, such as RoPE's frequencies, untouched), its gradients rounded to the reduce dtype,
summed and halved there, then stored as float32. Prints one JSON line per case on rank 0; exits non-zero on a mismatch.

usage: fsdp_precision_worker.py CASE[,CASE...]     CASE: PARAM_DTYPE/REDUCE_DTYPE[/keep]   (keep: no reshard after
forward), e.g. bfloat16/float32,bfloat16/bfloat16/keep,float32/float32
"""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist

from tests.parallel.equivalence_worker import mean_nll, relative_error, tiny_llama

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RTOL = 1e-6


def reference(model, halves, param_dtype, reduce_dtype) -> tuple[list[float], dict[str, torch.Tensor]]:
    """(each half's loss, the float32 mean gradient of every parameter) computed in one process."""
    losses, grads = [], []
    for ids in halves:
        copy_ = copy.deepcopy(model)
        for p in copy_.parameters():
            p.data = p.data.to(param_dtype)
        loss = mean_nll(copy_(input_ids=ids).logits, ids)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.to(reduce_dtype) for n, p in copy_.named_parameters()})
    mean = {n: ((grads[0][n] + grads[1][n]) / 2).float() for n in grads[0]}
    return losses, mean


def check(case: str) -> str:
    from torch.distributed.device_mesh import init_device_mesh

    from lowbit.parallel.fsdp import apply_fsdp2

    param_name, reduce_name, *keep = case.split("/")
    rank = dist.get_rank()
    model = tiny_llama()
    torch.manual_seed(1)
    batch = torch.randint(0, 96, (4, 16))
    halves = batch[:2], batch[2:]
    want_losses, want_grads = reference(model, halves, DTYPES[param_name], DTYPES[reduce_name])

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    sharded = apply_fsdp2(copy.deepcopy(model), mesh, param_dtype=param_name, reduce_dtype=reduce_name,
                          reshard_after_forward=not keep)
    seen = set()
    sharded.model.layers[0].register_forward_pre_hook(
        lambda module, args: seen.update({p.dtype for p in module.parameters()} | {args[0].dtype}))
    loss = mean_nll(sharded(input_ids=halves[rank]).logits, halves[rank])
    loss.backward()
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, loss.detach())
    errors = {"loss": max(abs(got.item() - want) / abs(want) for got, want in zip(losses, want_losses))}
    errors["gradient"] = max(relative_error(p.grad.full_tensor(), want_grads[n]) for n, p in sharded.named_parameters())
    dtypes = {"compute": sorted(str(d) for d in seen),
              "master": sorted({str(p.dtype) for p in sharded.parameters()}),
              "grad": sorted({str(p.grad.dtype) for p in sharded.parameters()})}
    row = {"case": case, **errors, **dtypes}
    if rank == 0:
        print(json.dumps(row), flush=True)
    wrong_dtypes = dtypes != {"compute": [str(DTYPES[param_name])], "master": ["torch.float32"],
                              "grad": ["torch.float32"]}
    if max(errors.values()) > RTOL or wrong_dtypes:
        return f"{case}: beyond {RTOL} or unexpected dtypes: {row}"
    return ""


def main() -> None:
    dist.init_process_group("gloo")
    failures = [f for f in map(check, sys.argv[1].split(",")) if f]
    dist.destroy_process_group()
    if failures:
        sys.exit("\n".join(failures))


if __name__ == "__main__":
    main()

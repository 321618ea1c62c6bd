"""torchrun worker: AdamA under DDP (gloo, no_sync as the trainer uses it) vs a float64 replay on rank 0.

Usage: torchrun --nproc_per_node=2 tests/optim/adama_ddp_worker.py RESULT.json [paper|summed]
"""
import gc
import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lowbit.optim.adama import AdamA
from tests.optim.test_adama import BETAS, EPS, LR, WD, groups, small_model

STEPS, MICRO_BATCHES = 5, 3


def rank_batches(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    return [[(torch.randn(3, 7, generator=generator), torch.randn(3, 3, generator=generator))
             for _ in range(MICRO_BATCHES)] for _ in range(STEPS)]


def float64_replay(world_size):
    """Paper's Algorithm 1 with g_i = mean over ranks of rank r's micro-batch-i gradient (loss / N)."""
    model = small_model().double()
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    data = [rank_batches(r) for r in range(world_size)]
    for t in range(1, STEPS + 1):
        m = [BETAS[0] * x for x in m]
        v = [BETAS[1] * x for x in v]
        for i in range(MICRO_BATCHES):
            summed = [torch.zeros_like(p) for p in params]
            for r in range(world_size):
                model.zero_grad()
                x, y = data[r][t - 1][i]
                ((model(x.double()) - y.double()) ** 2).mean().div(MICRO_BATCHES).backward()
                summed = [s + p.grad for s, p in zip(summed, params)]
            g = [s / world_size for s in summed]
            m = [a + (1 - BETAS[0]) * b for a, b in zip(m, g)]
            v = [a + (1 - BETAS[1]) * b * b for a, b in zip(v, g)]
        with torch.no_grad():
            for index, p in enumerate(params):
                p.mul_(1 - LR * (WD if p.ndim >= 2 else 0.0))
                p.sub_(LR * (m[index] / (1 - BETAS[0] ** t)) / ((v[index] / (1 - BETAS[1] ** t)).sqrt() + EPS))
    return params


def summed_replay(world_size):
    """second_moment=summed: AdamW's moments of the step's summed gradient in float64, with the packed state's two
    roundings (the sum in bfloat16 after each fold, v in bfloat16 once per step). Each micro-batch gradient is the
    ranks' float32 gradients summed and divided by the world size, as AdamA's all-reduce leaves it."""
    model = small_model()
    params = [p.detach().double().clone() for p in model.parameters()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    data = [rank_batches(r) for r in range(world_size)]
    for t in range(1, STEPS + 1):
        sums = [None] * len(params)
        for i in range(MICRO_BATCHES):
            for target, source in zip(model.parameters(), params):
                target.data.copy_(source.float())
            reduced = [torch.zeros_like(p) for p in model.parameters()]
            for r in range(world_size):
                model.zero_grad()
                x, y = data[r][t - 1][i]
                ((model(x) - y) ** 2).mean().div(MICRO_BATCHES).backward()
                reduced = [s + p.grad for s, p in zip(reduced, model.parameters())]
            for index, g in enumerate(reduced):
                g = g / world_size
                sums[index] = (g if sums[index] is None else sums[index].float() + g).bfloat16()
        with torch.no_grad():
            for index, p in enumerate(params):
                total = sums[index].double()
                m[index] = BETAS[0] * m[index] + (1 - BETAS[0]) * total
                v[index] = BETAS[1] * v[index].float().bfloat16().double() + (1 - BETAS[1]) * total * total
                p.mul_(1 - LR * (WD if p.ndim >= 2 else 0.0))
                p.sub_(LR * (m[index] / (1 - BETAS[0] ** t)) / ((v[index] / (1 - BETAS[1] ** t)).sqrt() + EPS))
    return params


def main(result_path, second_moment="paper"):
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    plain = small_model()
    model = DistributedDataParallel(plain)
    optimizer = AdamA(groups(plain), lr=LR, betas=BETAS, eps=EPS, second_moment=second_moment)
    for step_batches in rank_batches(rank):
        for x, y in step_batches:
            with model.no_sync():                 # the trainer's choice for an optimizer that reduces itself
                ((model(x) - y) ** 2).mean().div(MICRO_BATCHES).backward()
            optimizer.finish_micro_batch()
        optimizer.step()
        optimizer.zero_grad()
    flat = torch.cat([p.detach().flatten() for p in plain.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        replay = summed_replay if second_moment == "summed" else float64_replay
        expected = torch.cat([p.detach().flatten() for p in replay(world_size)])
        report = {"max_abs_error": (flat.double() - expected).abs().max().item(),
                  "ranks_agree": all(torch.equal(g, gathered[0]) for g in gathered)}
        with open(result_path, "w") as handle:
            json.dump(report, handle)
    # DDP's reducer holds the process group: drop it before the group is destroyed, or its teardown at
    # interpreter exit can abort gloo ("terminate called without an active exception", seen 1 run in ~10)
    del model, optimizer
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

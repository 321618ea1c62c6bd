"""Where does the offload step's activation peak occur? Peak allocated after each phase of one micro-batch."""
import sys, torch
sys.path.insert(0, "bench")
import memory as M
from lowbit.objectives.base import next_token_nll
for name in ("adamw+accum (baseline)", "adamw+offload", "adamw+offload (256 MiB in flight)"):
    opt_name, mem = M.CONFIGS[name]
    model, optimizer = M.build("llama_1b", opt_name, mem, 4096, False)
    for _ in range(2):
        M.train_step(model, optimizer, 1, 4096, 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):      # gradients allocated, as in a later micro-batch
        warm, n = next_token_nll(model, torch.randint(0, 49152, (1, 4096), device="cuda"))
    (warm / n).backward()
    marks = []
    def mark(label):
        torch.cuda.synchronize()
        marks.append((label, torch.cuda.max_memory_allocated() / 2**30))
        torch.cuda.reset_peak_memory_stats()
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: mark(f"fwd {i}")))
        handles.append(layer.register_full_backward_hook(lambda m, gi, go, i=i: mark(f"bwd {i}")))
    ids = torch.randint(0, 49152, (1, 4096), device="cuda")
    torch.cuda.synchronize(); before = torch.cuda.memory_allocated() / 2**30; torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        nll, n = next_token_nll(model, ids)
    mark("loss fwd")
    (nll / n).backward()
    mark("end")
    top = sorted(marks, key=lambda x: -x[1])[:5]
    print(name, "| before", round(before, 2), "| peaks above before:", [(l, round(v - before, 2)) for l, v in top], flush=True)
    for h in handles: h.remove()
    optimizer.zero_grad(set_to_none=True)
    del model, optimizer; M.release()

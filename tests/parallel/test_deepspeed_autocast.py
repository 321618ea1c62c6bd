"""DeepSpeed's forward keeps the trainer's autocast (it disables an outer autocast unless its own
torch_autocast section is on; every DeepSpeed run computed in float32 before engine_config set it)."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from lowbit.config import OptimConfig, ParallelConfig, TrainerConfig

deepspeed = pytest.importorskip("deepspeed")


@pytest.fixture
def one_process_group(tmp_path, monkeypatch):
    for name, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)            # what torchrun sets; DeepSpeed checks for it
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def output_dtype(autocast):
    from lowbit.parallel.deepspeed import build_engine, engine_config
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    trainer = TrainerConfig(global_batch_size=2, micro_batch_size=2)
    config = engine_config(ParallelConfig(data_parallel="deepspeed", zero_stage=2), trainer, OptimConfig(),
                           grad_accum=1, world_size=1, bf16=False, autocast=autocast)
    engine, _ = build_engine(model, torch.optim.AdamW(model.parameters()), config)
    with torch.autocast("cpu", dtype=torch.bfloat16):        # the trainer's context
        out = engine(torch.randn(2, 8))
    return out.dtype, config


def test_engine_forward_runs_under_the_trainers_autocast(one_process_group, monkeypatch):
    # DeepSpeed asks torch.is_autocast_enabled() with no device, i.e. about CUDA; on CPU it would not see the
    # trainer's autocast at all. Answer for the CPU autocast instead, so the engine takes the branch it takes
    # under the trainer's CUDA autocast on a GPU. (One test: DeepSpeed keeps process-group state that a second
    # process group in this process trips on.)
    is_enabled = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *device: is_enabled(*(device or ("cpu",))))
    dtype, config = output_dtype(None)
    assert "torch_autocast" not in config
    assert dtype == torch.float32     # the bug the section fixes: DeepSpeed disabled the outer autocast
    dtype, config = output_dtype(torch.bfloat16)
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert dtype == torch.bfloat16
    # The same process group (see above): under ZeRO-3 the module's own weights are empty partitions, yet the
    # FLOPs per token behind MFU must count the whole model (it logged 1/10 of the true MFU on 2 H200s).
    from lowbit.models.flops import matmul_parameters
    from lowbit.parallel.world import unwrap
    from lowbit.parallel.deepspeed import build_engine, engine_config
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    full = matmul_parameters(model)
    config = engine_config(ParallelConfig(data_parallel="deepspeed", zero_stage=3), TrainerConfig(
        global_batch_size=2, micro_batch_size=2), OptimConfig(), grad_accum=1, world_size=1, bf16=False, autocast=None)
    engine, _ = build_engine(model, torch.optim.AdamW(model.parameters()), config)
    plain = unwrap(engine)
    assert plain[0].weight.numel() == 0      # partitioned away
    assert full == 8 * 16 + 16 * 4 and matmul_parameters(plain) == full

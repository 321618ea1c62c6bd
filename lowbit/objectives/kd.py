"""QAT with knowledge distillation, BitDistiller-style (arXiv 2402.10631): objective.name=bitdistill.

The student is the model with its decoder linears fake-quantized (lowbit/quant/); the teacher is a frozen
copy of the model taken before fake quantization (bf16 by default, optionally on the CPU). Losses, each
a mean over predicted tokens and combined with the weights of objective.kd.losses:
  ce          next-token cross-entropy on the data
  forward_kl  KL(p_T || p_S) (mode covering)
  reverse_kl  KL(p_S || p_T) (mode seeking)
  cakld       gamma * KL(p_S || p_T) + (1 - gamma) * KL(p_T || p_S)           (BitDistiller CAKLD)
              gamma = teacher's mean probability of the data's next token     (BitDistiller: mean over the training data)
  topk_kl     forward KL over the teacher's top-k tokens plus one bin pooling the rest of the vocabulary
              (our reading of TopKLD, arXiv 2501.06218: the head is matched token by token, the tail as a whole)
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from lowbit.config import ObjectiveConfig
from lowbit.objectives.base import Objective, register
from lowbit.quant.clipping import calibrate_clipping
from lowbit.quant.fake_quant import make_format
from lowbit.quant.linear import attach_fake_quant, fake_quant_layers
from lowbit.quant.pack import export_packed

log = logging.getLogger("lowbit")

KD_LOSSES = ("ce", "forward_kl", "reverse_kl", "cakld", "topk_kl")
TEACHER_LOSSES = ("forward_kl", "reverse_kl", "cakld", "topk_kl")
TEACHER_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


# ---- token-level losses: logits [N, V] (any float dtype), computed in float32, mean over the N tokens ----

def _log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    return (F.log_softmax(student_logits.float() / temperature, dim=-1),
            F.log_softmax(teacher_logits.float() / temperature, dim=-1))


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """mean over tokens of KL(p || q) = sum_v p (log p - log q), from log-probabilities [N, V]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """mean_n sum_v p_T (log p_T - log p_S), times T^2 (Hinton et al. 2015: keeps gradient scale across T)."""
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(log_p_t, log_p_s) * temperature ** 2


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """mean_n sum_v p_S (log p_S - log p_T), times T^2."""
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(log_p_s, log_p_t) * temperature ** 2


def cakld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, confidence: float,
          temperature: float = 1.0) -> torch.Tensor:
    """Confidence-aware KL (BitDistiller, arXiv 2402.10631): gamma * reverse KL + (1 - gamma) * forward KL.

    The log-softmaxes are shared by both terms; gamma = 0 / 1 gives forward_kl / reverse_kl bit for bit.
    """
    check_confidence(confidence)
    return _cakld(student_logits, teacher_logits, confidence, temperature)


def check_confidence(confidence: float) -> None:
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"CAKLD confidence {confidence} is outside [0, 1]; set objective.kd.confidence in [0, 1] "
                         f"or < 0 to measure it")


def _cakld(student_logits, teacher_logits, confidence, temperature: float) -> torch.Tensor:
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature)
    return (confidence * _kl(log_p_s, log_p_t) + (1.0 - confidence) * _kl(log_p_t, log_p_s)) * temperature ** 2


_COMPILED: dict = {}


def compiled_loss(name: str):
    """The KD loss `name` under torch.compile (fused log-softmax / exp / KL over [N, V] instead of some
    ten full passes in float32); CAKLD takes its confidence as a 0-dim tensor so gamma's value is no guard."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(KD_FUNCTIONS[name], dynamic=False)
    return _COMPILED[name]


def topk_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL over k + 1 bins: the teacher's top-k tokens and the pooled rest (see the module doc), times T^2."""
    if not 1 <= k < teacher_logits.shape[-1]:
        raise ValueError(f"objective.kd.topk={k} must be in [1, vocabulary size {teacher_logits.shape[-1]})")
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    top = t.topk(k, dim=-1).indices

    def binned_log_probs(logits: torch.Tensor) -> torch.Tensor:
        log_z = logits.logsumexp(-1, keepdim=True)
        tail = logits.scatter(-1, top, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.cat([logits.gather(-1, top), tail], dim=-1) - log_z    # [N, k + 1] log-probabilities

    log_q_s, log_q_t = binned_log_probs(s), binned_log_probs(t)
    return (log_q_t.exp() * (log_q_t - log_q_s)).sum(-1).mean() * temperature ** 2


def next_token_confidence(teacher_logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of the teacher's probabilities of each next token, count): teacher_logits [B, S-1, V], input_ids [B, S]."""
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    target = input_ids[:, 1:].unsqueeze(-1)
    return log_p.gather(-1, target).exp().sum(), target.numel()


KD_FUNCTIONS = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "cakld": _cakld, "topk_kl": topk_kl}


# ---- the objective ----

def load_teacher(cfg, model: nn.Module) -> nn.Module:
    """The frozen teacher: a copy of `model` (before fake quantization) or cfg.teacher, in cfg.teacher_dtype."""
    if cfg.teacher_dtype not in TEACHER_DTYPES:
        raise ValueError(f"objective.kd.teacher_dtype={cfg.teacher_dtype!r} is not supported; use {list(TEACHER_DTYPES)}")
    if cfg.teacher:
        from transformers import AutoModelForCausalLM
        teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=TEACHER_DTYPES[cfg.teacher_dtype])
    else:
        teacher = copy.deepcopy(model)
    teacher.to(TEACHER_DTYPES[cfg.teacher_dtype]).eval().requires_grad_(False)
    check_same_vocabulary(model, teacher)
    return teacher


def check_same_vocabulary(student: nn.Module, teacher: nn.Module) -> None:
    student_vocab = student.get_output_embeddings().weight.shape[0]
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    if student_vocab != teacher_vocab:
        raise ValueError(f"the teacher's vocabulary ({teacher_vocab} tokens) does not match the student's "
                         f"({student_vocab}); KD compares distributions token by token, so use a teacher with the "
                         f"student's tokenizer (objective.kd.teacher='' copies the student)")


@register("bitdistill")
class BitDistill(Objective):
    """Fake-quantize the student's linears, hold a frozen teacher, train on the weighted KD losses."""

    def __init__(self, cfg: ObjectiveConfig, model: nn.Module, teacher: nn.Module | None = None):
        self.qat, self.kd = cfg.qat, cfg.kd
        losses = cfg.kd.losses if isinstance(cfg.kd.losses, dict) else OmegaConf.to_container(cfg.kd.losses)
        self.weights = {name: float(w) for name, w in losses.items() if float(w) != 0.0}
        unknown = sorted(set(self.weights) - set(KD_LOSSES))
        if unknown:
            raise ValueError(f"objective.kd.losses names unknown losses {unknown}; the losses are {list(KD_LOSSES)}")
        if not self.weights:
            raise ValueError(f"objective.kd.losses={losses} gives no loss a non-zero weight; give one a weight "
                             f"(e.g. objective.kd.losses.cakld=1, or objective.kd.losses.ce=1 for QAT without KD)")
        if cfg.kd.teacher_device not in ("auto", "cpu"):
            raise ValueError(f"objective.kd.teacher_device={cfg.kd.teacher_device!r} is not supported; use auto or cpu")
        self.teacher = None
        if any(name in TEACHER_LOSSES for name in self.weights):
            if teacher is not None:
                check_same_vocabulary(model, teacher)
                self.teacher = teacher.eval().requires_grad_(False)
            else:
                self.teacher = load_teacher(cfg.kd, model)
        fmt = make_format(cfg.qat.format, cfg.qat.group_size, cfg.qat.partial_groups)
        names = attach_fake_quant(model, fmt, list(cfg.qat.include), list(cfg.qat.exclude), cfg.qat.learnable_clip)
        if str(cfg.qat.compile).lower() not in ("auto", "true", "false"):
            raise ValueError(f"objective.qat.compile={cfg.qat.compile!r} is not auto, true or false")
        self.compiled = str(cfg.qat.compile).lower() == "true" or (
            str(cfg.qat.compile).lower() == "auto" and torch.cuda.is_available())
        for layer in fake_quant_layers(model).values():
            layer.compiled = self.compiled
        log.info("bitdistill: %d linears fake-quantized to %s (group %d); losses %s; teacher %s", len(names),
                 fmt.name, fmt.group_size, self.weights, "none" if self.teacher is None else cfg.kd.teacher or "copy")
        self.calibration_checked = False
        self.confidence = cfg.kd.confidence if cfg.kd.confidence >= 0 else None
        self.confidence_sum, self.confidence_count, self.confidence_batches = 0.0, 0, 0
        if self.confidence is not None and self.confidence > 1.0:
            raise ValueError(f"objective.kd.confidence={self.confidence} must be in [0, 1] (or < 0 to measure it)")

    def _calibrate_once(self, model: nn.Module, input_ids: torch.Tensor) -> None:
        """AWQ-style clipping search on the first training micro-batch (skipped when resumed: `calibrated` buffers)."""
        from lowbit.parallel import unwrap
        if self.calibration_checked:
            return
        self.calibration_checked = True
        plain = unwrap(model)
        layers = fake_quant_layers(plain)
        if not self.qat.clip_search or all(bool(layer.calibrated) for layer in layers.values()):
            return
        ratios = calibrate_clipping(plain, [input_ids], self.qat.clip_grid, self.qat.clip_max_shrink)
        log.info("bitdistill: clipping search on %d tokens: mean ratio %.3f over %d layers", input_ids.numel(),
                 sum(ratios.values()) / len(ratios), len(ratios))

    @torch.no_grad()
    def teacher_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher logits [B, S, V] on the student's device."""
        device = torch.device("cpu") if self.kd.teacher_device == "cpu" else input_ids.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        return self.teacher(input_ids=input_ids.to(device)).logits.to(input_ids.device)

    def _gamma(self, teacher_logits: torch.Tensor, input_ids: torch.Tensor) -> float:
        """CAKLD's gamma: fixed, or the running mean of the teacher's next-token probability (frozen after N batches)."""
        if self.confidence is not None:
            return self.confidence
        if self.confidence_batches < self.kd.confidence_batches:
            total, count = next_token_confidence(teacher_logits, input_ids)
            stats = torch.stack([total.double(), torch.tensor(float(count), dtype=torch.float64, device=total.device)])
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(stats)
            self.confidence_sum += stats[0].item()
            self.confidence_count += int(stats[1].item())
            self.confidence_batches += 1
        return self.confidence_sum / max(self.confidence_count, 1)

    def loss(self, model, input_ids):
        self._calibrate_once(model, input_ids)
        logits = model(input_ids=input_ids).logits[:, :-1]
        vocab = logits.shape[-1]
        student = logits.flatten(0, 1)
        metrics, total = {}, 0.0
        teacher = None
        if self.teacher is not None:
            teacher_logits = self.teacher_logits(input_ids)[:, :-1]
            if teacher_logits.shape[-1] != vocab:
                raise ValueError(f"teacher logits have {teacher_logits.shape[-1]} entries, the student's {vocab}; "
                                 f"use a teacher with the student's vocabulary")
            teacher = teacher_logits.flatten(0, 1)
        temperature = self.kd.temperature
        for name, weight in self.weights.items():
            fn = None if name == "ce" else compiled_loss(name) if self.compiled else KD_FUNCTIONS[name]
            if name == "ce":
                term = F.cross_entropy(student.float(), input_ids[:, 1:].flatten())
            elif name == "cakld":
                gamma = self._gamma(teacher_logits, input_ids)
                check_confidence(gamma)
                metrics["kd/confidence"] = gamma
                # compiled: gamma as a 0-dim tensor, so that its changing value is no recompilation guard
                term = fn(student, teacher, torch.tensor(gamma, device=student.device) if self.compiled else gamma,
                          temperature)
            elif name == "topk_kl":
                term = fn(student, teacher, self.kd.topk, temperature)
            else:
                term = fn(student, teacher, temperature)
            metrics[f"kd/{name}"] = term.detach().item()
            total = total + weight * term
        return total, metrics

    def frozen_models(self) -> list[nn.Module]:
        return [] if self.teacher is None else [self.teacher]

    def check_parallel(self, cfg) -> None:
        """The clipping search and the packed export read whole weight matrices, and the KL compares
        whole-vocabulary logits with the teacher's: layouts that shard weights or logits are refused
        (measured: TP failed in the clipping all-reduce, FSDP2 on mixed DTensor/Tensor operands)."""
        sharded = {"parallel.tp": cfg.tp > 1, "parallel.dp_shard": cfg.dp_shard > 1,
                   "parallel.zero_stage=3": cfg.data_parallel == "deepspeed" and cfg.zero_stage == 3}
        refused = [name for name, on in sharded.items() if on]
        if refused:
            raise ValueError(f"objective=bitdistill does not support {', '.join(refused)} (it shards the weights "
                             f"or logits that clipping, the KD losses and the packed export read whole); use "
                             f"parallel=ddp, parallel=ulysses2 or parallel=zero2 (ZeRO-1/2 shard optimizer state only)")

    def export(self, model: nn.Module, run_dir, state_dict: dict) -> dict:
        """Packed low-bit weights: RUN_DIR/quantized/model.safetensors (lowbit.quant.pack.load_packed reads it);
        the HF export keeps the high-precision student."""
        path = export_packed(model, Path(run_dir) / "quantized" / "model.safetensors")
        log.info("bitdistill: packed %s weights written to %s (load: lowbit.quant.pack.load_packed)",
                 self.qat.format, path)
        return state_dict

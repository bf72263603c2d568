"""Training: the step (DESIGN §3.1 step 8) and the single-process loop of `ultramem train --local`.

`train_step` is the paper's recipe for one batch and knows nothing of processes or clusters, so a
Ray worker reuses it unchanged (handing in its DDP wrapper as `forward`): forward under autocast,
loss + aux loss, backward, clip, AdamW on the dense parameters at `lr_at(step)`, value gradients
pushed through the model's ValueBackend at `lr * value_lr_multiplier(step)` (announced to the
backend by `begin_step` before the forward: in pooled mode the backend updates the rows during
backward), then the per-step model hook (TDQKR filter refresh).

`LocalTrainer` is the single-process loop around it: corpus, model + LocalBackend, periodic
evaluation (validation loss, bits per byte, memory utilization), `<run>/metrics.jsonl`, a tqdm
bar, and checkpoints (`<run>/checkpoints/step-N/`, DESIGN §5, via checkpoint_io.py) that a resumed
run continues from exactly: batches are a pure function of (seed, step), and the dense state,
AdamW state, tables with their optimizer state, π and the RNG state all come back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from model_workers import checkpoint_io
from model_workers.data import Corpus, DataConfig, eval_batches, get_batch, prepare_corpus
from model_workers.model import LanguageModel, ModelConfig
from model_workers.schedule import lr_at, value_lr_multiplier
from model_workers.tdqkr import TuckerCores
from model_workers.transfer import read_scalars
from model_workers.values import LocalBackend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How long and how hard to train, and how often to look and save."""

    max_steps: int = 1000  # optimizer steps in the whole run (a resumed run continues to it)
    lr: float = 3e-3  # peak dense learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50  # linear warmup steps
    weight_decay: float = 0.1  # decoupled, on >= 2-D dense weights only (paper: 0.1)
    beta1: float = 0.9  # AdamW β1 (paper)
    beta2: float = 0.95  # AdamW β2 (paper)
    grad_clip: float = 1.0  # max global norm of the dense gradients; 0 = off
    autocast: Literal["auto", "bf16", "off"] = "auto"  # auto = bf16 where the hardware has it
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    seed: int = 0  # data order (batches are a function of (seed, step)) and torch RNG
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    log_every: int = 10  # steps between metrics.jsonl train records
    eval_every: int = 100  # steps between evaluations (and at the end); 0 = only at the end
    eval_batches: int = 8  # validation batches per evaluation
    checkpoint_every: int = 500  # steps between checkpoints (and at the end); 0 = only at the end
    keep_checkpoints: int = 3  # newest checkpoints kept; 0 = keep all

    def __post_init__(self) -> None:
        if self.max_steps <= 0:
            raise ValueError(f"train.max_steps must be > 0, got {self.max_steps}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("train.lr must be > 0 and train.min_lr_ratio in [0, 1]")
        for name in ("warmup_steps", "threads", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("log_every", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("train.beta1 and train.beta2 must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("train.weight_decay and train.grad_clip must be >= 0")


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did."""

    loss: float  # language-model loss (nats/token) of the batch
    aux_loss: float  # memory aux loss added to it
    lr: float  # dense LR used
    value_lr: float  # value-table LR used (lr * value multiplier)
    grad_norm: float  # dense gradient norm before clipping


# ----------------------------------------------------------------------------------- the step


def resolve_device(cfg: TrainConfig) -> torch.device:
    """cuda when asked or (auto) available, else cpu."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 when asked, or (auto) when the hardware runs it fast (AMX/AVX512-BF16, or a bf16 GPU)."""
    if cfg.autocast == "off":
        return None
    if cfg.autocast == "bf16":
        return torch.bfloat16
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_has_bf16()
    return torch.bfloat16 if fast else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for `dtype`, or a no-op when None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def decays(module: nn.Module, param: nn.Parameter) -> bool:
    """Whether `param` (a direct parameter of `module`) gets weight decay: >= 2-D weights do; norm
    gains, biases and the Tucker cores (4-D, [h, H, r, r], but a handful of mixing weights whose
    scale is the score scale: the paper leaves them undecayed) do not."""
    return param.dim() >= 2 and not isinstance(module, TuckerCores)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW β=(0.9, 0.95); weight decay on >= 2-D weights only (norm gains, biases, cores: none)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:  # tied weights: once
                seen.add(id(p))
                (decay if decays(module, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def train_step(model: LanguageModel, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
               targets: torch.Tensor, *, step: int, cfg: TrainConfig, max_steps: int,
               amp_dtype: torch.dtype | None = None, forward: nn.Module | None = None) -> StepResult:
    """One optimizer step on inputs/targets int64 [B, T] at 0-based `step`.

    `forward` is the module called for the forward pass (e.g. a DDP wrapper of `model`; default
    `model`); `max_steps` sets the schedules' length. Values are updated through the model's
    backend (model.push_value_grads); dense parameters by `optimizer`.
    """
    lr = lr_at(step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=max_steps,
               min_lr_ratio=cfg.min_lr_ratio)
    value_lr = lr * value_lr_multiplier(step, model.cfg.memory, max_steps) if model.cfg.has_memory else 0.0
    for group in optimizer.param_groups:
        group["lr"] = lr

    if model.backend is not None:  # pooled mode updates values during backward: it needs these now
        model.backend.begin_step(step, value_lr)
    module = forward if forward is not None else model
    model.train()
    with autocast(inputs.device, amp_dtype):
        out = module(inputs, targets)
    total = out.loss.float() + out.aux_loss.float()
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # a device tensor: no sync here
    optimizer.step()
    model.push_value_grads(lr, step, max_steps)  # values at lr * multiplier, by the backend's optimizer
    model.after_optimizer_step()  # e.g. refresh the TDQKR rank-1 filter from the updated cores
    loss, aux_loss, norm = read_scalars(out.loss, out.aux_loss, grad_norm)  # the step's one scalar read
    return StepResult(loss, aux_loss, lr, value_lr, norm)


@torch.no_grad()
def evaluate(model: LanguageModel, corpus: Corpus, data_cfg: DataConfig, *, max_batches: int,
             device: torch.device, amp_dtype: torch.dtype | None = None, rank: int = 0,
             world_size: int = 1) -> dict[str, float]:
    """Mean validation loss (nats/token) over fixed windows, and bits per UTF-8 byte."""
    model.eval()
    loss_sum, tokens = 0.0, 0
    for x, y in eval_batches(corpus.val, batch_size=data_cfg.batch_size, seq_len=data_cfg.seq_len,
                             max_batches=max_batches, rank=rank, world_size=world_size):
        with autocast(device, amp_dtype):
            out = model(x.to(device), y.to(device))
        loss_sum += float(out.loss) * y.numel()
        tokens += y.numel()
    model.train()
    val_loss = loss_sum / tokens
    return {"val_loss": val_loss, "val_bpb": corpus.bits_per_byte(val_loss)}


# ----------------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class TrainResult:
    """Summary of a finished run."""

    run_dir: Path
    steps: int  # optimizer steps done in total
    train_loss: float  # mean loss of the last log window
    val_loss: float  # at the end
    val_bpb: float  # at the end
    unigram_entropy: float  # nats/token, the baseline val_loss must beat
    tokens_per_s: float  # training throughput of this process (evaluation excluded)
    checkpoint: Path | None  # the last checkpoint written


class LocalTrainer:
    """The single-process training loop (`ultramem train --local`) with eval, metrics and checkpoints."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig,
                 run_dir: str | Path, *, config: dict[str, Any], progress: bool = True) -> None:
        """`config` is the resolved run config as a plain dict: saved in every checkpoint."""
        self.model_cfg, self.cfg, self.data_cfg = model_cfg, train_cfg, data_cfg
        self.run_dir = Path(run_dir)
        self.config = config
        self.progress = progress
        if train_cfg.threads:
            torch.set_num_threads(train_cfg.threads)
        self.device = resolve_device(train_cfg)
        self.amp_dtype = autocast_dtype(train_cfg, self.device)

        self.corpus = prepare_corpus(data_cfg)
        if self.corpus.tokenizer.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"tokenizer has {self.corpus.tokenizer.vocab_size} tokens but model.vocab_size "
                             f"is {model_cfg.vocab_size}")
        torch.manual_seed(train_cfg.seed)
        self.model = LanguageModel(model_cfg).to(self.device)
        # the model made a LocalBackend (tables in this process, initialized) when it has memories
        self.backend: LocalBackend | None = self.model.backend  # type: ignore[assignment]
        self.optimizer = make_optimizer(self.model, train_cfg)
        self.step = 0  # optimizer steps done
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.corpus.tokenizer.save(self.run_dir / "tokenizer.json")

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def resume(self, path: str | Path, *, verified: bool = False) -> Path:
        """Load a checkpoint (or the newest valid one under a run/checkpoints dir); returns it.

        verified: `path` is a step directory checkpoint_io.find_checkpoint already verified."""
        ckpt = Path(path) if verified else checkpoint_io.resume_point(path, self.run_dir)
        state = checkpoint_io.load_checkpoint(ckpt, self.model, backend=self.backend, optimizer=self.optimizer)
        self.step = int(state["step"])
        rng = (state.get("rng") or {}).get("torch")
        if rng is not None:
            torch.set_rng_state(rng)
        else:  # a checkpoint written on Ray: batches are a function of (seed, step), so nothing is lost
            logger.info("%s holds no torch RNG state (written by the distributed trainer); keeping ours", ckpt)
        logger.info("resumed from %s at step %d", ckpt, self.step)
        return ckpt

    def save(self) -> Path:
        """Write <run>/checkpoints/step-N/ (manifest last), then prune old ones."""
        state = {"step": self.step, "rng": {"torch": torch.get_rng_state()},
                 "data": {"seed": self.cfg.seed, "next_step": self.step}}
        path = checkpoint_io.save_checkpoint(
            self.checkpoint_root, self.step, model=self.model, backend=self.backend, optimizer=self.optimizer,
            train_state=state,
            config=self.config, tokenizer_json=self.corpus.tokenizer.to_json())
        if self.cfg.keep_checkpoints:
            checkpoint_io.prune_checkpoints(self.checkpoint_root, keep=self.cfg.keep_checkpoints)
        return path

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _eval(self) -> dict[str, float]:
        mem = self.model.memory_metrics(reset=True)  # utilization over the training window
        ev = evaluate(self.model, self.corpus, self.data_cfg, max_batches=self.cfg.eval_batches,
                      device=self.device, amp_dtype=self.amp_dtype)
        self._log({"kind": "eval", "step": self.step, **ev, "memory": mem,
                   "unigram_entropy": self.corpus.unigram_entropy})
        logger.info("step %d: val loss %.4f, %.4f bits/byte", self.step, ev["val_loss"], ev["val_bpb"])
        return ev

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of the current step: a function of (seed, step), so resume sees the same data."""
        x, y = get_batch(self.corpus.train, self.step, seed=self.cfg.seed,
                         batch_size=self.data_cfg.batch_size, seq_len=self.data_cfg.seq_len)
        return x.to(self.device), y.to(self.device)

    def run(self, max_steps: int | None = None) -> TrainResult:
        """Train until `max_steps` (default train.max_steps) steps are done; returns the summary.

        The schedules always span train.max_steps, so stopping early and resuming later follows
        the same curve as one uninterrupted run.
        """
        stop = min(max_steps or self.cfg.max_steps, self.cfg.max_steps)
        bar = tqdm(total=stop, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        window: list[float] = []
        last_window: list[float] = []  # losses of the last logged window
        tokens_per_step = self.data_cfg.batch_size * self.data_cfg.seq_len
        train_time, train_steps, ev, ckpt = 0.0, 0, None, None
        try:
            while self.step < stop:
                x, y = self._batch()
                t0 = time.perf_counter()
                res = train_step(self.model, self.optimizer, x, y, step=self.step, cfg=self.cfg,
                                 max_steps=self.cfg.max_steps, amp_dtype=self.amp_dtype)
                dt = time.perf_counter() - t0
                train_time, train_steps = train_time + dt, train_steps + 1
                self.step += 1
                window.append(res.loss)
                tok_s = tokens_per_step * train_steps / train_time
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                if self.step % self.cfg.log_every == 0 or self.step == stop:
                    self._log({"kind": "train", "step": self.step, "loss": sum(window) / len(window),
                               "aux_loss": res.aux_loss, "lr": res.lr, "value_lr": res.value_lr,
                               "grad_norm": res.grad_norm, "tokens_per_s": tok_s, "time": time.time()})
                    last_window, window = window, []
                if (self.cfg.eval_every and self.step % self.cfg.eval_every == 0) or self.step == stop:
                    ev = self._eval()
                    bar.set_postfix(loss=f"{res.loss:.3f}", val=f"{ev['val_loss']:.3f}", tok_s=f"{tok_s:,.0f}")
                if (self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0) or self.step == stop:
                    ckpt = self.save()
        finally:
            bar.close()
        if ev is None:  # nothing left to train (resumed at the end): still report where we are
            ev = self._eval()
        return TrainResult(
            run_dir=self.run_dir, steps=self.step,
            train_loss=sum(last_window) / len(last_window) if last_window else float("nan"),
            val_loss=ev["val_loss"], val_bpb=ev["val_bpb"], unigram_entropy=self.corpus.unigram_entropy,
            tokens_per_s=tokens_per_step * train_steps / train_time if train_time else 0.0,
            checkpoint=ckpt or checkpoint_io.latest(self.checkpoint_root))

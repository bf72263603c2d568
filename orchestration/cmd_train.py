"""`ultramem train --local` and `ultramem generate` (DESIGN §7.1).

train: resolve the run config (defaults < checkpoint being resumed < preset < --config < --set <
--max-steps), write it into the run directory, train in this process (model_workers/trainer.py),
print a summary. generate: rebuild the model from a checkpoint's config, load its dense state and
tables into an in-process LocalBackend, and print the prompt with a sampled continuation.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from orchestration.config import RunConfig, load_config, save_config, to_dict
from orchestration.errors import ConfigError, UsageError

logger = logging.getLogger(__name__)

_CLUSTER_FLAGS = ("address", "shards", "workers", "consistency")


def _resolve(args: argparse.Namespace, base: dict | None) -> RunConfig:
    overrides = list(args.set)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    for flag in ("shards", "workers", "consistency"):  # shorthands for cluster.<flag>
        if getattr(args, flag, None) is not None:
            overrides.append(f'cluster.{flag}="{getattr(args, flag)}"' if flag == "consistency"
                             else f"cluster.{flag}={getattr(args, flag)}")
    return load_config(preset=args.preset, path=args.config, overrides=overrides, base=base)


def _run_dir_of(checkpoint: Path) -> Path:
    """<run>/checkpoints/step-N -> <run>; a checkpoint elsewhere -> its parent directory."""
    parent = checkpoint.parent
    return parent.parent if parent.name == "checkpoints" else parent


def train(args: argparse.Namespace) -> int:
    """Train a model: in this process with `--local`, else on Ray (orchestration/distributed.py)."""
    from model_workers import checkpoint_io
    from model_workers.data import DataError
    from model_workers.trainer import LocalTrainer
    from storage.errors import CheckpointError

    given = [f"--{f}" for f in _CLUSTER_FLAGS if getattr(args, f, None) is not None]
    if args.local and given:
        raise UsageError(f"{', '.join(given)} only apply to distributed training, not --local")

    try:
        found = checkpoint_io.find_checkpoint(args.resume) if args.resume else None  # verified
        base = checkpoint_io.read_config(found) if found else None
    except CheckpointError as err:
        raise UsageError(f"cannot resume: {err}") from None
    cfg = _resolve(args, base)
    if args.out:
        run_dir = Path(args.out)
    elif found is not None:
        run_dir = _run_dir_of(found)
    else:
        run_dir = Path("runs") / f"{args.preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = found
    if found is not None:  # damaged checkpoints find_checkpoint fell back past: never met again
        checkpoint_io.set_aside_passed(args.resume, found, run_dir)
    save_config(cfg, run_dir / "config.toml")

    if not args.local:
        return _train_distributed(cfg, run_dir, args, checkpoint)
    try:
        trainer = LocalTrainer(cfg.model, cfg.train, cfg.data, run_dir, config=to_dict(cfg),
                               progress=not args.no_progress)
        if checkpoint is not None:
            trainer.resume(checkpoint, verified=True)
    except DataError as err:
        raise UsageError(str(err)) from None
    except CheckpointError as err:
        raise UsageError(f"cannot resume: {err}") from None
    except ValueError as err:  # e.g. the tokenizer outgrew model.vocab_size
        raise ConfigError(str(err)) from None

    result = trainer.run()
    print(f"run:            {result.run_dir}")
    print(f"steps:          {result.steps}")
    print(f"val loss:       {result.val_loss:.4f} nats/token ({result.val_bpb:.4f} bits/byte)")
    print(f"unigram:        {result.unigram_entropy:.4f} nats/token (train-split unigram entropy)")
    print(f"throughput:     {result.tokens_per_s:,.0f} tokens/s")
    print(f"checkpoint:     {result.checkpoint}")
    return 0


def _train_distributed(cfg: RunConfig, run_dir: Path, args: argparse.Namespace, checkpoint: Path | None) -> int:
    """Train on Ray: shards and workers as actors (embedded local Ray unless --address)."""
    from model_workers.data import DataError
    from orchestration.distributed import ShardStartError, train_distributed

    try:
        result = train_distributed(cfg, run_dir, address=args.address, resume=checkpoint,
                                   progress=not args.no_progress, resume_verified=True)
    except (DataError, ShardStartError) as err:
        raise UsageError(str(err)) from None
    print(f"run:            {result.run_dir}")
    print(f"steps:          {result.steps}")
    print(f"val loss:       {result.val_loss:.4f} nats/token ({result.val_bpb:.4f} bits/byte)")
    print(f"unigram:        {result.unigram_entropy:.4f} nats/token (train-split unigram entropy)")
    print(f"throughput:     {result.tokens_per_s:,.0f} tokens/s, {result.lookups_per_s:,.0f} rows looked up/s "
          f"(staleness {result.staleness_mean:.2f} steps, bound {result.staleness_bound})")
    print(f"checkpoint:     {result.checkpoint}")
    print(f"shards:         {', '.join(result.shard_addresses)}")
    return 0


def generate(args: argparse.Namespace) -> int:
    """Print PROMPT followed by a sampled continuation from a checkpoint."""
    import torch

    from model_workers import checkpoint_io
    from model_workers.model import LanguageModel
    from model_workers.tokenizer import Tokenizer
    from storage.errors import CheckpointError

    if args.max_tokens < 0 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError("need --max-tokens >= 0, --temperature >= 0 and 0 < --top-p <= 1")
    try:
        ckpt = checkpoint_io.find_checkpoint(args.checkpoint)
        cfg = load_config(base=checkpoint_io.read_config(ckpt))
        tok_path = ckpt / checkpoint_io.TOKENIZER
        if not tok_path.is_file():
            raise UsageError(f"{ckpt} has no {checkpoint_io.TOKENIZER}")
        tokenizer = Tokenizer.load(tok_path)
        model = LanguageModel(cfg.model)
        checkpoint_io.load_checkpoint(ckpt, model, backend=model.backend)  # type: ignore[arg-type]
    except CheckpointError as err:
        raise UsageError(f"cannot load checkpoint: {err}") from None
    model.eval()

    ids = tokenizer.encode(args.prompt) or [tokenizer.eot_id]
    tokens = torch.tensor([ids[-cfg.model.max_seq_len:]], dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    out = model.generate(tokens, args.max_tokens, temperature=args.temperature, top_p=args.top_p, generator=gen)
    print(args.prompt + tokenizer.decode(out[0, tokens.shape[1]:].tolist()))
    return 0

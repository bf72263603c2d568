"""`ultramem demo` (what `make demo` runs): the main job on the embedded default (DESIGN §1).

Local Ray on 127.0.0.1, 2 parameter-server shards and 1 model worker, the `small` preset on the
real corpus with a progress bar, a checkpoint, then a sample generated from that checkpoint. Ray
is shut down at the end, so no process is left behind.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from orchestration.config import load_config, save_config

DEMO_STEPS = 200  # ~0.8M tokens: a few minutes on 2 CPU cores, well below the unigram baseline
PROMPT = "The state of the Union is"


def demo(args: argparse.Namespace) -> int:
    """Train `small` on local Ray (2 shards, 1 worker), checkpoint, then generate."""
    from model_workers.data import DataError
    from orchestration.cmd_train import generate
    from orchestration.distributed import train_distributed
    from orchestration.errors import UsageError

    steps = args.max_steps or DEMO_STEPS
    cfg = load_config(preset="small", overrides=[f"train.max_steps={steps}", "train.eval_every=50",
                                                 f"train.checkpoint_every={steps}", "cluster.shards=2",
                                                 "cluster.workers=1", "cluster.consistency=\"async\""])
    run_dir = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.toml")
    print(f"ultramem demo: training the `small` preset for {steps} steps on local Ray "
          f"(2 shards, 1 worker) -> {run_dir}", flush=True)
    t0 = time.perf_counter()
    try:
        result = train_distributed(cfg, run_dir, progress=True)
    except DataError as err:
        raise UsageError(str(err)) from None
    print(f"trained {result.steps} steps in {time.perf_counter() - t0:.0f} s: "
          f"val loss {result.val_loss:.3f} nats/token ({result.val_bpb:.3f} bits/byte) vs a unigram baseline of "
          f"{result.unigram_entropy:.3f}; {result.tokens_per_s:,.0f} tokens/s, "
          f"{result.lookups_per_s:,.0f} rows looked up/s, "
          f"staleness {result.staleness_mean:.2f} steps (bound {result.staleness_bound})")
    print(f"checkpoint: {result.checkpoint}")
    print("sample:", flush=True)
    gen_args = argparse.Namespace(checkpoint=str(result.checkpoint), local=True, max_tokens=60, temperature=0.8,
                                  top_p=0.95, seed=0, prompt=PROMPT)
    return generate(gen_args)

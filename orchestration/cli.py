"""The `ultramem` command line (DESIGN §7.1).

This module only builds the argument tree and dispatches; each command is one function in the
module named beside it (imported lazily, so `ultramem table inspect` never pays for torch or Ray).
Exit status: 0 on success, 2 on a usage or input error (one line, no traceback), 1 otherwise.
Any other failure is one line too (orchestration.errors.describe names the file, shard or worker);
`ultramem --debug ...` or ULTRAMEM_DEBUG=1 prints the traceback as well.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from orchestration.errors import DEBUG_ENV, UsageError, describe

logger = logging.getLogger(__name__)

# command path -> "module:function"; the function takes the parsed argparse.Namespace, returns an int
_HANDLERS: dict[str, str] = {
    "table create": "orchestration.cmd_table:create",
    "table inspect": "orchestration.cmd_table:inspect",
    "shard serve": "orchestration.cmd_shard:serve",
    "train": "orchestration.cmd_train:train",
    "generate": "orchestration.cmd_train:generate",
    "demo": "orchestration.cmd_demo:demo",
    "serve": "orchestration.cmd_serve:serve",
    "cluster up": "orchestration.cmd_cluster:up",
    "cluster status": "orchestration.cmd_cluster:status",
    "cluster down": "orchestration.cmd_cluster:down",
    "shards scale": "orchestration.cmd_scale:scale",
    "plan": "orchestration.cmd_plan:plan",
    "bench": "orchestration.cmd_bench:bench",
    "experiment quality": "orchestration.cmd_experiment:quality",
    "report": "orchestration.cmd_report:report",
    "checkpoint verify": "orchestration.cmd_checkpoint:verify",
}


def _add_table(sub: argparse._SubParsersAction) -> None:
    table = sub.add_parser("table", help="create or inspect a memory table (Zarr v3)")
    tsub = table.add_subparsers(dest="subcommand", required=True)
    create = tsub.add_parser("create", help="create a table, initialised partition by partition")
    create.add_argument("path")
    create.add_argument("--rows", type=int, required=True, help="physical rows P")
    create.add_argument("--dim", type=int, required=True, help="value dim d_v")
    create.add_argument("--partitions", type=int, default=256, help="partitions NP (>= shard count)")
    create.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    create.add_argument("--optimizer", choices=["adamw", "adagrad", "sgd"], default="adamw")
    create.add_argument("--init-std", type=float, default=0.02)
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--name", default=None, help="table name (default: the directory name)")
    create.add_argument("--raw", action="store_true",
                        help="store the optimizer state uncompressed, as the values are: a shard with a RAM "
                             "budget (`shard serve --ram-budget-mb`) reads and writes its chunks in place")
    inspect = tsub.add_parser("inspect", help="spec, partitions, bytes, optimizer state")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")


def _add_shard(sub: argparse._SubParsersAction) -> None:
    shard = sub.add_parser("shard", help="run a standalone parameter-server shard")
    ssub = shard.add_subparsers(dest="subcommand", required=True)
    serve = ssub.add_parser("serve", help="serve table partitions over gRPC until SIGTERM")
    serve.add_argument("--table", action="append", required=True, help="table path (repeatable)")
    serve.add_argument("--partitions", default=None, help="e.g. 0-127 or 0,2,4 (default: all)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--token-file", default=None, help="file holding the shared-secret token")
    serve.add_argument("--read-only", action="store_true")
    serve.add_argument("--tls-cert", default=None, help="PEM certificate: serve TLS only (with --tls-key)")
    serve.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    serve.add_argument("--tls-client-ca", default=None, help="PEM CA: require client certificates (mTLS)")
    serve.add_argument("--checkpoint-dir", default=None,
                       help="allow the Checkpoint RPC, writing only under this directory (default: refused)")
    serve.add_argument("--shard-id", type=int, default=0)
    serve.add_argument("--num-shards", type=int, default=1)
    serve.add_argument("--ram-budget-mb", type=float, default=None,
                       help="RAM for partition data; the rest is served through a chunk cache (table open r+)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a model (embedded local Ray unless --local)")
    train.add_argument("--local", action="store_true", help="one process, in-process memory")
    train.add_argument("--preset", default=None, help="tiny | small | ...")
    train.add_argument("--config", default=None, help="TOML file")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. model.d_model=512 (repeatable)")
    train.add_argument("--out", default=None, help="run directory")
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--resume", default=None, help="run or checkpoint directory to resume from")
    train.add_argument("--address", default=None, help="Ray address: auto | HOST:PORT")
    train.add_argument("--shards", type=int, default=None)
    train.add_argument("--workers", type=int, default=None)
    train.add_argument("--consistency", choices=["sync", "async"], default=None)
    train.add_argument("--no-progress", action="store_true")

    gen = sub.add_parser("generate", help="sample a continuation from a checkpoint")
    gen.add_argument("--checkpoint", required=True)
    gen.add_argument("--local", action="store_true")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("prompt")

    demo = sub.add_parser("demo", help="the main job on the embedded default (what `make demo` runs)")
    demo.add_argument("--out", default=None)
    demo.add_argument("--max-steps", type=int, default=None)


def _add_rest(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve a checkpoint over HTTP with remote lookups")
    serve.add_argument("--checkpoint", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--shards", default=None, help="ADDR,ADDR,... of running shards")
    serve.add_argument("--address", default=None)
    serve.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (needs ray[serve])")
    serve.add_argument("--token-file", default=None, help="shared-secret token: HTTP bearer and shard auth")
    serve.add_argument("--local-shards", type=int, default=1, help="read-only shards to start (no --shards)")
    serve.add_argument("--in-process", action="store_true", help="start the shards in this process")
    serve.add_argument("--wire-dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16",
                       help="dtype of looked-up values on the wire")
    serve.add_argument("--max-batch", type=int, default=64, help="sequences decoded together")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0, help="idle wait to gather a batch")
    serve.add_argument("--shard-tls-cert", default=None, help="with --address: PEM certificate the shards serve")
    serve.add_argument("--shard-tls-key", default=None, help="PEM private key of --shard-tls-cert")
    serve.add_argument("--shard-tls-ca", default=None, help="PEM CA the engine trusts for the shards (TLS on)")

    cluster = sub.add_parser("cluster", help="wrap Ray's own CLI for a real cluster")
    csub = cluster.add_subparsers(dest="subcommand", required=True)
    up = csub.add_parser("up", help="ray start: a head node, or join one with --address")
    up.add_argument("--host", default="127.0.0.1", help="this node's IP (127.0.0.1 = this machine only)")
    up.add_argument("--port", type=int, default=6379)
    up.add_argument("--memory-shards", type=int, default=0, help="memory_shard units on this node")
    up.add_argument("--model-workers", type=int, default=0, help="model_worker units on this node")
    up.add_argument("--address", default=None, help="join this head instead of starting one")
    up.add_argument("--temp-dir", default=None, help="Ray's session/socket/log directory on this node")
    st = csub.add_parser("status", help="ray status")
    st.add_argument("--address", default=None)
    csub.add_parser("down", help="ray stop: ends EVERY Ray process on this machine")

    shards = sub.add_parser("shards", help="operate on the running shards")
    shsub = shards.add_subparsers(dest="subcommand", required=True)
    scale = shsub.add_parser("scale")
    scale.add_argument("--to", type=int, required=True)
    scale.add_argument("--address", default="auto")

    plan = sub.add_parser("plan", help="bytes per shard before anything is allocated")
    group = plan.add_mutually_exclusive_group(required=True)
    group.add_argument("--config")
    group.add_argument("--preset")
    plan.add_argument("--shards", type=int, default=None, help="shard count (default: cluster.shards)")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--nodes", type=int, default=1, help="nodes the shards are spread over")
    plan.add_argument("--node-ram-gb", type=float, default=None,
                      help="RAM per node in GiB (default: this machine's RAM)")
    plan.add_argument("--cache-gb", type=float, default=None,
                      help="data budget per shard in GiB: larger partitions go through a chunk cache")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--tokens-per-s", type=float, default=None,
                      help="target training tokens/s: also report the shard processes and cores it needs")
    plan.add_argument("--rates", default=None, metavar="JSON",
                      help="per-core shard rates: a memory_path.json from `ultramem bench memory-path` "
                           "(default: the rates shipped with the package, measured on a 2-core machine)")

    bench = sub.add_parser("bench", help="benchmarks: ratios measured side by side, JSON results")
    bench.add_argument("which", nargs="?", default="all",
                       choices=["lookup", "train", "wire", "beyond-ram", "serve", "overlap", "checkpoint",
                                "memory-path", "all"])
    bench.add_argument("--out", default="bench/results")
    bench.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")

    exp = sub.add_parser("experiment", help="research experiments")
    esub = exp.add_subparsers(dest="subcommand", required=True)
    quality = esub.add_parser("quality")
    quality.add_argument("--quick", action="store_true")
    quality.add_argument("--seeds", default="1,2,3")
    quality.add_argument("--config", default=None)
    quality.add_argument("--out", default=None)
    quality.add_argument("--sweep", action="append", default=None,
                         help="axis=v1,v2,... (num_keys, tokens): one compute-matched experiment per point; repeatable")

    report = sub.add_parser("report", help="PNG plots and a summary table for a run")
    report.add_argument("run_dir")

    ckpt = sub.add_parser("checkpoint", help="inspect checkpoints")
    cksub = ckpt.add_subparsers(dest="subcommand", required=True)
    verify = cksub.add_parser("verify", help="check every checkpoint of a run against its manifest")
    verify.add_argument("path", help="a run directory, its checkpoints/ directory, or one step-N")


def build_parser() -> argparse.ArgumentParser:
    """The whole argument tree of DESIGN §7.1."""
    parser = argparse.ArgumentParser(prog="ultramem", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("--debug", action="store_true",
                        help=f"print the traceback of a failure (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_table(sub)
    _add_shard(sub)
    _add_train(sub)
    _add_rest(sub)
    return parser


def _handler(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    key = args.command if getattr(args, "subcommand", None) is None else f"{args.command} {args.subcommand}"
    target = _HANDLERS.get(key)
    if target is None:
        raise UsageError(f"unknown command: {key}")
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise UsageError(f"`ultramem {key}` is not available in this build yet") from None
        raise
    return getattr(module, func_name)


def _passive_openmp(args: argparse.Namespace) -> None:
    """Serving decodes beside its shard processes: idle OpenMP threads sleep instead of spinning.

    libgomp's workers spin after each parallel region by default; at batch 1 a decode step is a
    string of small parallel ops, so the spinning holds the cores the co-located shards need to answer
    the step's lookups (measured, 2 cores, 1 shard: remote hop 1.8-2.2 ms spinning, 1.5-1.7 ms
    passive, local decode unchanged). libgomp reads the variable once, when torch loads it, so it
    is set here, before any command module imports torch; a value the user set is kept.
    """
    if args.command == "serve" or (args.command == "bench" and getattr(args, "which", None) == "serve"):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ultramem` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _passive_openmp(args)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return int(_handler(args)(args) or 0)
    except KeyboardInterrupt:
        print("ultramem: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user (DESIGN §7.1); the traceback only when asked
        code, message = describe(err)
        if debug:
            traceback.print_exc()
        hint = "" if debug or isinstance(err, UsageError) else f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
        print(f"ultramem: error: {message}{hint}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())

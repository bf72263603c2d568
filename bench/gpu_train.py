"""GPU path check (issue 7): the `small` preset with the worker's dense compute on the GPU and the
value tables on CPU shards, against the local backend on the same GPU, in one run.

    python bench/gpu_train.py [--quick]         # needs a CUDA build of torch (make ... TORCH_SPEC=...)

It is `bench/train.py` with device="cuda": three legs (local backend, remote rows, remote pooled)
taking turns, 2 `ultramem shard serve` processes on the CPU, tokens/s and the ratio to local printed
side by side, JSON in bench/results/train-cuda.json. On a machine without Ray it still runs: the
shards are plain subprocesses (they need zarr and grpcio; no Ray).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (CPU figures: `ultramem bench train`)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("ultramem_bench_train", REPO / "bench" / "train.py")
    assert spec is not None and spec.loader is not None
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    result = train.run(args.out, quick=args.quick, device="cuda")
    src, dst = Path(args.out) / "train.json", Path(args.out) / "train-cuda.json"
    shutil.move(src, dst)
    legs = result["legs"]
    local = legs["local"]["tokens_per_s"]
    print(json.dumps({"device": torch.cuda.get_device_name(0),
                      **{name: {"tokens_per_s": round(leg["tokens_per_s"]), "ratio_to_local":
                                round(leg["tokens_per_s"] / local, 3)} for name, leg in legs.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The training job's shard token (issue 16): fresh per job, required by every shard, handed out
through Ray only, never written to the run directory."""

from __future__ import annotations

import numpy as np
import pytest

from orchestration.distributed import DistributedTrainer
from param_server.client import Client
from param_server.errors import UnauthenticatedError

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_jobs_shards_require_its_fresh_token_which_never_reaches_the_run_directory(ray_session, e2e, tmp_path):
    tokens = []
    for run in ("a", "b"):
        trainer = DistributedTrainer(e2e.tiny_config(steps=2, shards=2, workers=1), tmp_path / run, progress=False)
        try:
            trainer.run()
            config = trainer.client_config()
            tokens.append(config.token)
            address = trainer.pmap_addresses()[0]
            with Client([address], config=config) as client:
                assert client.gather("mem0.values", np.array([0], np.int64)).shape[0] == 1
            with pytest.raises(UnauthenticatedError):
                Client([address])  # no token: refused before anything is read
            assert config.token not in repr(config) and config.token not in repr(trainer._server_config())
        finally:
            trainer.close()
        files = [p for p in (tmp_path / run).rglob("*") if p.is_file()]
        assert files and not any(tokens[-1].encode() in p.read_bytes() for p in files)
    assert len(set(tokens)) == 2 and all(len(t) >= 32 for t in tokens)

"""Where a shard actor listens on a cluster node (param_server/bind.py) and what it does when its node
cannot see the run directory (param_server/actor.py)."""

from __future__ import annotations

import pytest

from param_server.actor import ShardActor, ShardActorConfig
from param_server.bind import resolve_bind
from param_server.errors import ConfigError, PathNotFoundError


def test_node_binds_and_reports_the_nodes_address() -> None:
    assert resolve_bind("node", "10.0.0.7") == ("10.0.0.7", "10.0.0.7")


def test_an_interface_name_binds_its_address() -> None:
    assert resolve_bind("lo", "10.0.0.7") == ("127.0.0.1", "127.0.0.1")


def test_a_wildcard_is_bound_only_when_named_and_reports_the_nodes_address() -> None:
    assert resolve_bind("0.0.0.0", "10.0.0.7") == ("0.0.0.0", "10.0.0.7")
    assert resolve_bind("127.0.0.2", "10.0.0.7") == ("127.0.0.2", "127.0.0.2")


def test_an_unknown_interface_is_a_config_error_listing_the_interfaces() -> None:
    with pytest.raises(ConfigError, match=r"no network interface 'nosuch0'.*lo"):
        resolve_bind("nosuch0", "10.0.0.7")


def test_a_shard_that_cannot_see_the_run_directory_fails_at_start_naming_path_and_node(tmp_path) -> None:
    missing = tmp_path / "elsewhere" / "tables" / "mem0.values"
    config = ShardActorConfig(shard_id=3, table_paths={"mem0.values": str(missing)}, partitions=(0,),
                              checkpoint_root=str(tmp_path / "elsewhere" / "checkpoints"))
    with pytest.raises(PathNotFoundError, match=rf"shard 3 on node \S+ \(.+\) cannot see {missing}.*same path"):
        ShardActor(config)

"""`ultramem serve` and `ultramem bench serve` make idle OpenMP threads sleep (orchestration/cli.py)."""

from __future__ import annotations

import os

import pytest

from orchestration.cli import _passive_openmp, build_parser


@pytest.mark.parametrize(("argv", "expected"), [
    (["serve", "--checkpoint", "ckpt"], "PASSIVE"),
    (["bench", "serve"], "PASSIVE"),
    (["bench", "train"], None),
    (["bench"], None),
    (["table", "inspect", "t"], None),
])
def test_only_serving_commands_make_openmp_passive(monkeypatch, argv, expected):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    _passive_openmp(build_parser().parse_args(argv))
    assert os.environ.get("OMP_WAIT_POLICY") == expected


def test_a_wait_policy_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    _passive_openmp(build_parser().parse_args(["serve", "--checkpoint", "ckpt"]))
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"

"""The committed generated protobuf code is exactly what protos/generate.py makes (STYLE §14)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from protos.ultramem.v1 import memory_pb2 as pb

REPO = Path(__file__).resolve().parents[2]


def _generate_module():
    spec = importlib.util.spec_from_file_location("protos_generate", REPO / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    gen = _generate_module()
    paths = gen.generate(tmp_path)
    assert len(paths) == 3
    for fresh in paths:
        committed = REPO / fresh.relative_to(tmp_path)
        assert committed.read_bytes() == fresh.read_bytes(), f"{committed} is stale: run python protos/generate.py"


def test_service_has_every_operation_of_design_4_2() -> None:
    service = pb.DESCRIPTOR.services_by_name["MemoryShard"]
    assert {m.name for m in service.methods} == {
        "Gather", "PooledGather", "PushGradients", "PooledBackward", "Info", "GetPartitionMap", "Checkpoint"}
    assert service.full_name == "ultramem.v1.MemoryShard"


def test_arrays_travel_as_bytes_never_repeated_floats() -> None:
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        for field in message.fields:
            assert field.type not in (field.TYPE_FLOAT, field.TYPE_DOUBLE) or not field.is_repeated, (
                f"{message.name}.{field.name} is a repeated float")
    data = pb.Tensor.DESCRIPTOR.fields_by_name["data"]
    assert data.type == data.TYPE_BYTES


def test_lookups_and_pushes_carry_the_consistency_fields() -> None:
    lookup = pb.LookupHeader.DESCRIPTOR.fields_by_name
    assert {"table", "epoch", "worker_id", "min_step"} <= set(lookup)
    assert lookup["min_step"].has_presence
    assert {"table", "epoch", "worker_id", "seq", "step", "lr"} <= set(pb.PushHeader.DESCRIPTOR.fields_by_name)

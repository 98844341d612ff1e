"""The generated protobuf and gRPC modules (`pb2`, `pb2_grpc`), built from the proto if needed."""

from __future__ import annotations

from editserve.control.codegen import ensure_generated

ensure_generated()

from editserve.control._gen import editserve_pb2 as pb2  # noqa: E402
from editserve.control._gen import editserve_pb2_grpc as pb2_grpc  # noqa: E402

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["EditService"].full_name

__all__ = ["pb2", "pb2_grpc", "SERVICE_NAME"]

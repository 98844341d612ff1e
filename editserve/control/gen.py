"""The generated protobuf and gRPC modules (`pb2`, `pb2_grpc`) of ``editserve.v1``.

They are made at build time (see `editserve.control.codegen`) and only read here: nothing is
written into the package at run time. In a checkout, ``make venv`` (or
``python -m editserve.control.codegen``) makes them; a wheel ships them.
"""

from __future__ import annotations

from editserve.control.codegen import GEN_DIR, CodegenError, stale_reason



def _require_stubs() -> None:
    why = stale_reason()
    if why is not None:
        raise CodegenError(f"{why}: run `python -m editserve.control.codegen` in the checkout (make venv does), "
                           "or install the editserve wheel, which ships them")


_require_stubs()

from editserve.control._gen import editserve_pb2 as pb2  # noqa: E402
from editserve.control._gen import editserve_pb2_grpc as pb2_grpc  # noqa: E402

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["EditService"].full_name
PROTO_FILE = GEN_DIR / "editserve.proto"        # the API definition the stubs were made from

__all__ = ["pb2", "pb2_grpc", "SERVICE_NAME", "PROTO_FILE"]

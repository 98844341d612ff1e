"""Build step of the editserve wheel: the gRPC stubs are generated here, never at run time.

Everything else is declared in pyproject.toml. ``build_py`` runs protoc (``grpcio-tools``, a
build requirement) on ``protos/editserve/v1/editserve.proto`` and places
``editserve/control/_gen/{__init__,editserve_pb2,editserve_pb2_grpc}.py`` (plus ``.pyi``, a copy
of the proto and its digest) into the build directory, so the wheel ships them. In an editable
install (``pip install -e``, what ``make venv`` does) they are written into the checkout's
``editserve/control/_gen/`` (git-ignored) instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _codegen():
    """editserve/control/codegen.py, loaded by path (it needs only the standard library and grpc_tools)."""
    spec = importlib.util.spec_from_file_location("_editserve_codegen", ROOT / "editserve" / "control" / "codegen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithStubs(build_py):
    """``build_py`` plus the generated gRPC stubs of the control plane."""

    def run(self) -> None:
        super().run()
        codegen = _codegen()
        proto = codegen.source_proto(ROOT)
        if getattr(self, "editable_mode", False):
            codegen.generate(ROOT / "editserve" / "control" / "_gen", proto)
        else:
            codegen.generate(Path(self.build_lib) / "editserve" / "control" / "_gen", proto)


setup(cmdclass={"build_py": BuildPyWithStubs})

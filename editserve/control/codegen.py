"""Generate the Python gRPC stubs of ``protos/editserve/v1/editserve.proto`` (never hand-written).

``python -m editserve.control.codegen`` (run by ``make venv``) writes
``editserve/control/_gen/{editserve_pb2,editserve_pb2_grpc}.py`` (git-ignored). `ensure_generated`
does the same on first import when the stubs are missing or older than the proto, so a fresh
clone works with or without the Makefile step. The generated grpc module's absolute import of
``editserve_pb2`` is rewritten to a relative one (``editserve`` is also this package's name).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from pathlib import Path

from editserve.errors import EditserveError

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
GEN_DIR = PACKAGE_DIR / "_gen"
PROTO_ENV = "EDITSERVE_PROTO"
STAMP = "proto.sha256"


class CodegenError(EditserveError, RuntimeError):
    """The proto file is missing or protoc failed."""


def proto_path() -> Path:
    """The proto: $EDITSERVE_PROTO, else ``protos/editserve/v1/editserve.proto`` of the source tree."""
    env = os.environ.get(PROTO_ENV)
    if env:
        return Path(env)
    return PACKAGE_DIR.parents[1] / "protos" / "editserve" / "v1" / "editserve.proto"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_current(gen_dir: Path = GEN_DIR) -> bool:
    """Whether stubs exist and (when the proto is available) were made from the current proto."""
    have = all((gen_dir / n).is_file() for n in ("editserve_pb2.py", "editserve_pb2_grpc.py", "__init__.py"))
    if not have:
        return False
    proto = proto_path()
    stamp = gen_dir / STAMP
    if not proto.is_file():
        return True                       # installed without the source tree: use what was built
    return stamp.is_file() and stamp.read_text().strip() == _digest(proto)


def generate(gen_dir: Path = GEN_DIR) -> Path:
    """Run protoc (grpc_tools) on the proto into `gen_dir`, atomically; returns `gen_dir`."""
    proto = proto_path()
    if not proto.is_file():
        raise CodegenError(f"the API definition {str(proto)!r} is missing; set {PROTO_ENV} to editserve.proto")
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise CodegenError("grpcio-tools is not installed; `pip install grpcio-tools` (make venv does)") from exc
    import grpc_tools

    gen_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="_gen.", dir=gen_dir.parent))
    include = str(Path(grpc_tools.__file__).resolve().parent / "_proto")
    rc = protoc.main(["grpc_tools.protoc", f"-I{proto.parent}", f"-I{include}", f"--python_out={tmp}",
                      f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", str(proto)])
    if rc != 0:
        raise CodegenError(f"protoc failed on {str(proto)!r} with exit code {rc}")
    grpc_file = tmp / "editserve_pb2_grpc.py"
    text = grpc_file.read_text()
    fixed = text.replace("import editserve_pb2 as editserve__pb2", "from . import editserve_pb2 as editserve__pb2")
    if fixed == text:
        raise CodegenError(f"unexpected protoc output in {grpc_file}: no import of editserve_pb2 to rewrite")
    grpc_file.write_text(fixed)
    (tmp / "__init__.py").write_text('"""Generated from protos/editserve/v1/editserve.proto; do not edit."""\n')
    (tmp / STAMP).write_text(_digest(proto) + "\n")
    if gen_dir.exists():
        old = Path(tempfile.mkdtemp(prefix="_old.", dir=gen_dir.parent))
        try:
            gen_dir.rename(old / "gen")
        except FileNotFoundError:
            log.debug("%s vanished while being replaced (another process regenerated it)", gen_dir)
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(gen_dir)
    except OSError:
        import shutil

        if not is_current(gen_dir):
            raise
        shutil.rmtree(tmp, ignore_errors=True)          # another process won the race with the same proto
    log.info("generated gRPC stubs in %s from %s", gen_dir, proto)
    return gen_dir


def ensure_generated(gen_dir: Path = GEN_DIR) -> None:
    if not is_current(gen_dir):
        generate(gen_dir)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = generate()
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generate the Python gRPC stubs of ``protos/editserve/v1/editserve.proto`` (never hand-written).

Stubs are made at build time, never at run time: the wheel's build step (``setup.py``'s
``build_py``) calls `generate` into the wheel's ``editserve/control/_gen/`` (with a copy of the
proto), and a development checkout gets them from ``make venv``, which runs
``python -m editserve.control.codegen`` (writes ``editserve/control/_gen/`` of the checkout,
git-ignored). Importing `editserve.control.gen` only reads them. The generated grpc module's
absolute import of ``editserve_pb2`` is rewritten to a relative one (``editserve`` is also this
package's name).

This module imports only the standard library and, inside `generate`, ``grpc_tools`` (a build
requirement), so that ``setup.py`` can load it by path before editserve is installed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
GEN_DIR = PACKAGE_DIR / "_gen"
PROTO_ENV = "EDITSERVE_PROTO"
PROTO_NAME = "editserve.proto"
STAMP = "proto.sha256"
STUBS = ("editserve_pb2.py", "editserve_pb2_grpc.py", "__init__.py")


class CodegenError(RuntimeError):
    """The proto file is missing, protoc failed, or the stubs are missing or stale.

    (Deliberately not an `editserve.errors.EditserveError`: this module must load without
    editserve installed, from ``setup.py``.)"""


def source_proto(source_root: Path | None = None) -> Path:
    """The proto of a source tree: $EDITSERVE_PROTO, else ``<root>/protos/editserve/v1/editserve.proto``."""
    env = os.environ.get(PROTO_ENV)
    if env and source_root is None:
        return Path(env)
    root = source_root if source_root is not None else PACKAGE_DIR.parents[1]
    return root / "protos" / "editserve" / "v1" / PROTO_NAME


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stubs_present(gen_dir: Path = GEN_DIR) -> bool:
    return all((gen_dir / n).is_file() for n in STUBS)


def stale_reason(gen_dir: Path = GEN_DIR) -> str | None:
    """Why the stubs in `gen_dir` cannot be used (missing, or made from another proto than the
    source tree's, when there is a source tree), or None when they can. Reads only."""
    if not stubs_present(gen_dir):
        return f"the gRPC stubs are missing from {gen_dir}"
    proto = source_proto()
    if not proto.is_file():
        return None                       # an installed wheel: the stubs it was built with
    stamp = gen_dir / STAMP
    if not stamp.is_file() or stamp.read_text().strip() != digest(proto):
        return f"the gRPC stubs in {gen_dir} were generated from another version of {proto}"
    return None


def generate(gen_dir: Path = GEN_DIR, proto: Path | None = None) -> Path:
    """Run protoc (grpc_tools) on `proto` into `gen_dir`, atomically, with a copy of the proto and
    its digest; returns `gen_dir`."""
    proto = proto if proto is not None else source_proto()
    if not proto.is_file():
        raise CodegenError(f"the API definition {str(proto)!r} is missing; set {PROTO_ENV} to editserve.proto")
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as exc:
        raise CodegenError("grpcio-tools is not installed; `pip install grpcio-tools` (a build requirement, "
                           "and in the dev extra)") from exc

    gen_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="_gen.", dir=gen_dir.parent))
    try:
        include = str(Path(grpc_tools.__file__).resolve().parent / "_proto")
        rc = protoc.main(["grpc_tools.protoc", f"-I{proto.parent}", f"-I{include}", f"--python_out={tmp}",
                          f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", str(proto)])
        if rc != 0:
            raise CodegenError(f"protoc failed on {str(proto)!r} with exit code {rc}")
        grpc_file = tmp / "editserve_pb2_grpc.py"
        text = grpc_file.read_text()
        fixed = text.replace("import editserve_pb2 as editserve__pb2",
                             "from . import editserve_pb2 as editserve__pb2")
        if fixed == text:
            raise CodegenError(f"unexpected protoc output in {grpc_file}: no import of editserve_pb2 to rewrite")
        grpc_file.write_text(fixed)
        (tmp / "__init__.py").write_text('"""Generated from protos/editserve/v1/editserve.proto; do not edit."""\n')
        shutil.copyfile(proto, tmp / PROTO_NAME)
        (tmp / STAMP).write_text(digest(proto) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)                # mkdtemp makes the directory 0700; the files stay readable
        tmp.chmod(0o755)
        if gen_dir.exists():
            old = Path(tempfile.mkdtemp(prefix="_old.", dir=gen_dir.parent))
            try:
                gen_dir.rename(old / "gen")
            except FileNotFoundError:
                log.debug("%s vanished while being replaced", gen_dir)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(gen_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("generated gRPC stubs in %s from %s", gen_dir, proto)
    return gen_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m editserve.control.codegen [OUT_DIR]``: (re)generate the checkout's stubs."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = sys.argv[1:] if argv is None else argv
    out = generate(Path(args[0]) if args else GEN_DIR)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

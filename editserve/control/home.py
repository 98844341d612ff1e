"""The local admin token under ``$EDITSERVE_HOME``: secure by default with no set-up.

A server started with no token configured (neither ``EDITSERVE_CONTROL_TOKEN`` nor
``EDITSERVE_CONTROL_TOKENS_FILE``) creates, once, a tokens file holding one random admin token
at ``$EDITSERVE_HOME/control-tokens.json`` (mode 0600, in a 0700 directory) and uses it; the CLI
on the same machine reads the same file when no ``--token``/``--token-file`` is given. Nothing
is ever left open: there is no "no token" mode.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

from editserve.errors import DataError

log = logging.getLogger(__name__)

HOME_ENV = "EDITSERVE_HOME"
LOCAL_TOKENS_NAME = "control-tokens.json"
LOCAL_ADMIN_NAME = "local-admin"


def editserve_home(environ: dict[str, str] | None = None) -> Path:
    """``$EDITSERVE_HOME``, default ``~/.cache/editserve``."""
    env = os.environ if environ is None else environ
    return Path(env.get(HOME_ENV) or Path.home() / ".cache" / "editserve")


def local_tokens_file(environ: dict[str, str] | None = None) -> Path:
    """Where the auto-created admin tokens file lives."""
    return editserve_home(environ) / LOCAL_TOKENS_NAME


def ensure_local_admin_token(environ: dict[str, str] | None = None) -> Path:
    """The local tokens file, created with one fresh admin token if it does not exist.

    Created atomically with ``O_CREAT | O_EXCL`` and mode 0600, so two servers starting at
    once agree on one token and no other user can read it. An existing file that others can
    read is refused (``DataError``) rather than trusted."""
    path = local_tokens_file(environ)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        token = secrets.token_urlsafe(32)
        body = json.dumps({token: {"role": "admin", "name": LOCAL_ADMIN_NAME}}, indent=1).encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass                                    # another process created it first: use theirs
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            log.warning("no control token was configured: created an admin token in %s (mode 0600); "
                        "the editserve CLI on this machine uses it by default", path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise DataError(f"the local tokens file {str(path)!r} is readable by other users (mode {mode:o}); "
                        "run 'chmod 600' on it or remove it to have a new one created")
    return path


def local_admin_token(environ: dict[str, str] | None = None) -> str | None:
    """The admin token of the local tokens file, or None if there is no such file."""
    path = local_tokens_file(environ)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the local tokens file {str(path)!r}: {type(exc).__name__}") from None
    for token, value in (data.items() if isinstance(data, dict) else ()):
        role = value if isinstance(value, str) else value.get("role") if isinstance(value, dict) else None
        if role == "admin":
            return str(token)
    return None

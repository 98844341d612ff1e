"""Where a ledger lives: a directory (SQLite file + blob files) or a PostgreSQL database (DSN).

A DSN may carry a password, so it is kept out of every repr, log line, exception and status
output: `LedgerLocation.__str__` and `redact_dsn` show ``postgresql://user@host:port/db`` (no
password, no ``password=`` / ``sslpassword=`` query parameters). Only the PostgreSQL
connection code reads `LedgerLocation.dsn`.

Resolution order when no location is passed (`location_from_env`):
``$EDITSERVE_LEDGER_DSN_FILE`` (a file holding the DSN, e.g. a mounted Kubernetes Secret), then
``$EDITSERVE_LEDGER`` (a directory or a DSN).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from editserve.errors import InvalidRequestError

ENV_LEDGER = "EDITSERVE_LEDGER"
ENV_DSN_FILE = "EDITSERVE_LEDGER_DSN_FILE"
DSN_SCHEMES = ("postgresql://", "postgres://")
_SECRET_PARAMS = frozenset({"password", "sslpassword"})

SQLITE = "sqlite"
POSTGRESQL = "postgresql"


def is_dsn(text: str | os.PathLike[str]) -> bool:
    """True for ``postgresql://…`` / ``postgres://…`` URIs (case-insensitive scheme)."""
    return isinstance(text, str) and text.strip().lower().startswith(DSN_SCHEMES)


def redact_dsn(dsn: str) -> str:
    """The DSN without its password: ``postgresql://user@host:port/db?host=/run/pg`` (secret params dropped)."""
    try:
        parts = urlsplit(dsn.strip())
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, hosts = netloc.rsplit("@", 1)
            netloc = f"{userinfo.split(':', 1)[0]}@{hosts}"
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() not in _SECRET_PARAMS]
        out = f"{parts.scheme}://{netloc}{parts.path}"
        return out + (f"?{urlencode(query, safe='/')}" if query else "")
    except ValueError:
        return "postgresql://<unparseable DSN>"


def scrub(text: str, dsn: str | None) -> str:
    """`text` with the DSN and its password (if any) replaced by the redacted form / ``***``."""
    if not dsn:
        return text
    text = text.replace(dsn, redact_dsn(dsn))
    try:
        parts = urlsplit(dsn.strip())
        secrets = [parts.password] if parts.password else []
        secrets += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() in _SECRET_PARAMS and v]
    except ValueError:                               # unparseable: find the password by pattern
        found = re.search(r"://[^:/@]*:([^@]+)@", dsn)
        secrets = [found.group(1)] if found else []
        secrets += re.findall(r"(?:^|[?&])(?:ssl)?password=([^&]+)", dsn, flags=re.IGNORECASE)
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


@dataclass(frozen=True)
class LedgerLocation:
    """A ledger directory (`path`) or a PostgreSQL DSN (`dsn`, secret: never shown)."""

    path: Path | None = None
    dsn: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.dsn is None):
            raise InvalidRequestError("a ledger location is either a directory or a PostgreSQL DSN")
        if self.dsn is not None and not is_dsn(self.dsn):
            raise InvalidRequestError(f"a ledger DSN must start with {' or '.join(DSN_SCHEMES)}, got "
                                      f"{self.dsn.split(':', 1)[0]!r}:…")

    @property
    def backend(self) -> str:
        return SQLITE if self.path is not None else POSTGRESQL

    @property
    def redacted(self) -> str:
        return str(self.path) if self.path is not None else redact_dsn(str(self.dsn))

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return f"LedgerLocation({self.redacted!r})"

    @classmethod
    def parse(cls, where: str | os.PathLike[str] | LedgerLocation) -> LedgerLocation:
        if isinstance(where, LedgerLocation):
            return where
        if is_dsn(where):
            return cls(dsn=str(where).strip())
        return cls(path=Path(where).expanduser())


def read_dsn_file(path: str | os.PathLike[str]) -> LedgerLocation:
    """The DSN held in `path` (surrounding whitespace ignored). Errors name the file, never its content."""
    from editserve.ledger.errors import LedgerError

    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise LedgerError(f"cannot read the ledger DSN file {str(path)!r} (${ENV_DSN_FILE}): "
                          f"{exc.strerror or type(exc).__name__}") from None
    if not is_dsn(text):
        raise LedgerError(f"the ledger DSN file {str(path)!r} (${ENV_DSN_FILE}) does not hold a "
                          f"{' or '.join(DSN_SCHEMES)} DSN")
    return LedgerLocation(dsn=text)


def location_from_env(env: Mapping[str, str] | None = None) -> LedgerLocation | None:
    """The ledger named by ``$EDITSERVE_LEDGER_DSN_FILE`` or ``$EDITSERVE_LEDGER``, or None."""
    env = os.environ if env is None else env
    if env.get(ENV_DSN_FILE):
        return read_dsn_file(env[ENV_DSN_FILE])
    if env.get(ENV_LEDGER):
        return LedgerLocation.parse(env[ENV_LEDGER])
    return None

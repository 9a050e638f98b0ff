"""Bearer tokens, tenants and roles (grpc-free: the interceptor in ``auth.py`` is the only caller).

The tokens file (``server.auth_tokens``, ``--auth-tokens``) is a YAML list; it holds each token's SHA-256,
never the token::

    - {name: ci-bot, tenant: acme, role: client, sha256: 9f86d08...}
    - {name: oncall, tenant: ops, role: operator, sha256: 60303ae...}

A presented token is hashed and compared with every entry by ``hmac.compare_digest``, with no early exit,
so the time taken says nothing about which entry (or how much of one) matched. ``TokenFile`` re-reads the file
when it changes, so adding or revoking a token needs no restart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from orchestrator.config import CONFIG, TENANT_PATTERN

log = logging.getLogger("streamgen.tokens")
BEARER = "bearer "
MAX_TOKEN_CHARS = 4096  # longer is refused without hashing (cheap to reject a flood of huge headers)


class Role(str, Enum):
    CLIENT = "client"  # its own streams: Generate, Control, capacity totals
    OPERATOR = "operator"  # also the operator RPCs (Drain, replica details)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's label, its tenant (who owns the streams it starts) and its role."""

    name: str
    tenant: str
    role: Role

    @property
    def operator(self) -> bool:
        return self.role is Role.OPERATOR


OPEN = Principal("open", "", Role.OPERATOR)
"""Every caller of a server without a tokens file: one tenant, every RPC allowed (loopback demos)."""
ANONYMOUS = Principal("anonymous", "", Role.CLIENT)
"""A caller nobody vouched for: health probes, and refused calls (for their request id only)."""


class AuthFailure(str, Enum):
    """Why a call was refused (the ``reason`` label of streamgen_auth_failures_total)."""

    MISSING = "missing"  # no authorization header
    MALFORMED = "malformed"  # not "Bearer <token>", or several
    INVALID = "invalid"  # no entry has this token's hash
    FORBIDDEN = "forbidden"  # a valid token whose role may not call the RPC


@pydantic_dataclass(frozen=True, config=CONFIG)
class TokenEntry:
    """One line of the tokens file."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    """A label for logs (never the token)."""
    tenant: Annotated[str, Field(pattern=TENANT_PATTERN)]
    """The tenant whose streams this token starts and sees."""
    role: Literal["client", "operator"]
    """client, or operator (may also call Drain and see replica details)."""
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]
    """Hex SHA-256 of the token's UTF-8 bytes."""


_FILE = TypeAdapter(list[TokenEntry])


def token_sha256(token: str) -> str:
    """The hex digest the tokens file stores for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenTable:
    """The accepted tokens, as hashes."""

    def __init__(self, entries: list[TokenEntry]):
        if not entries:
            raise ValueError("the tokens file lists no token (leave auth_tokens empty to run open)")
        digests = [bytes.fromhex(e.sha256) for e in entries]
        if len(set(digests)) != len(digests):
            raise ValueError("the tokens file lists the same sha256 twice")
        self._entries = [(d, Principal(e.name, e.tenant, Role(e.role))) for d, e in zip(digests, entries)]

    @classmethod
    def load(cls, path: str) -> "TokenTable":
        """Read and check the file; errors name the file, the entry and the field (``[2].role``)."""
        import yaml

        with open(path) as f:
            try:
                raw = yaml.safe_load(f)
            except yaml.YAMLError as err:
                raise ValueError(f"{path}: not a YAML list: {err}") from None
        try:
            return cls(_FILE.validate_python(raw if raw is not None else []))
        except ValidationError as err:
            problems = "; ".join(
                "[" + "].".join(str(p) for p in e["loc"]) + ": " +
                ("unknown key" if e["type"] == "unexpected_keyword_argument" else e["msg"])
                for e in err.errors(include_url=False, include_input=False))
            raise ValueError(f"{path}: {problems}") from None
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tenants(self) -> set[str]:
        return {p.tenant for _, p in self._entries}

    def authenticate(self, token: str) -> Principal | None:
        """The principal whose entry holds this token's hash, or None. Every entry is compared."""
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for entry_digest, principal in self._entries:
            if hmac.compare_digest(entry_digest, digest):
                found = principal
        return found


class TokenFile:
    """The tokens file as served: checked once per call for a change (one ``stat``), re-read when it changed.
    A changed file that does not load keeps the last good table in service, and says so once."""

    def __init__(self, path: str):
        """Loads it now: OSError or ValueError (naming the entry and field) if it is unusable."""
        self.path = path
        self._stamp = self._identity()
        self.table = TokenTable.load(path)
        self.reloads = 0

    def authenticate(self, token: str) -> Principal | None:
        self._refresh()
        return self.table.authenticate(token)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def tenants(self) -> set[str]:
        return self.table.tenants

    def _identity(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _refresh(self) -> None:
        try:
            stamp = self._identity()
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return
        self._stamp = stamp  # a broken file is reported once, not on every call
        try:
            self.table = TokenTable.load(self.path)
        except (OSError, ValueError) as err:
            log.warning("the tokens file changed but cannot be used (%s); the last good one stays in service",
                        getattr(err, "strerror", None) or err)
            return
        self.reloads += 1
        log.info("tokens file reloaded: %d tokens", len(self.table))


def bearer_token(values: list[str]) -> tuple[str | None, AuthFailure | None]:
    """The token of the request's ``authorization`` values: (token, None) or (None, why not)."""
    if not values:
        return None, AuthFailure.MISSING
    if len(values) > 1:
        return None, AuthFailure.MALFORMED
    value = values[0]
    if len(value) > MAX_TOKEN_CHARS or value[: len(BEARER)].lower() != BEARER or not value[len(BEARER):].strip():
        return None, AuthFailure.MALFORMED
    return value[len(BEARER):].strip(), None

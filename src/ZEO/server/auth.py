"""Authorization of TLS clients: which verified certificate may use which storage, and how.

ZEO lets every client with a verified certificate use every storage read-write.  An
``<authorization>`` section in ``<zeo>`` (it needs ``<ssl>``) narrows that::

    <authorization>
      default none                       # a verified client no rule names: none, ro or rw
      allow cn:alice * rw                # subject common name, any storage
      allow cn:reports main ro
      allow sha256:3F:A1:...:09 main rw  # SHA-256 fingerprint of the certificate (DER)
      allow * archive ro                 # every verified client
    </authorization>

Rules only grant.  A client gets the highest access of the rules that match it and the
storage, or ``default`` when none does.  The server enforces it in ``register``:

* ``none``: the register fails exactly as for an unknown storage (a client cannot probe
  which storages exist);
* ``ro``: a read-write register gets ``ReadOnlyError`` (so read-only-fallback clients then
  register read-only), and ``pack`` is refused too, unlike a plain read-only connection;
* ``rw``: as without authorization.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

NONE, READ_ONLY, READ_WRITE = "none", "ro", "rw"
_LEVELS = {NONE: 0, READ_ONLY: 1, READ_WRITE: 2}
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Identity:
    """What a rule can name of a verified client certificate."""

    common_names: tuple[str, ...]
    sha256: str  # lowercase hex, no colons

    def describe(self) -> str:
        cn = ",".join(self.common_names) or "?"
        return f"cn:{cn} sha256:{self.sha256[:16]}…"


@dataclass(frozen=True)
class Rule:
    """``allow <who> <storage-or-*> <ro|rw>``; ``who`` is ``cn:NAME``, ``sha256:HEX`` or ``*``."""

    kind: str  # "cn", "sha256" or "*"
    value: str
    storage_id: str  # or "*"
    access: str

    def matches(self, identity: Identity, storage_id: str) -> bool:
        if self.storage_id not in ("*", storage_id):
            return False
        if self.kind == "*":
            return True
        if self.kind == "cn":
            return self.value in identity.common_names
        return self.value == identity.sha256


def parse_rule(text: str) -> Rule:
    """A rule from its config text; raise ValueError (with the reason) when malformed."""
    parts = text.split()
    if len(parts) != 3:
        raise ValueError(f"an allow rule is 'WHO STORAGE ro|rw', not {text!r}")
    who, storage_id, access = parts
    access = access.lower()
    if access not in (READ_ONLY, READ_WRITE):
        raise ValueError(f"access must be ro or rw, not {access!r}")
    if who == "*":
        return Rule("*", "", storage_id, access)
    kind, sep, value = who.partition(":")
    kind = kind.lower()
    if not sep or not value or kind not in ("cn", "sha256"):
        raise ValueError(f"a client is cn:NAME, sha256:FINGERPRINT or *, not {who!r}")
    if kind == "sha256":
        value = value.replace(":", "").lower()
        if not _HEX64.fullmatch(value):
            raise ValueError(f"a SHA-256 fingerprint has 64 hex digits, not {who!r}")
    return Rule(kind, value, storage_id, access)


@dataclass
class Authorization:
    """The rules of one server; :meth:`access` answers for one client and storage."""

    rules: list[Rule] = field(default_factory=list)
    default: str = NONE

    def access(self, identity: Identity | None, storage_id: str) -> str:
        """``none``, ``ro`` or ``rw`` for ``identity`` (None: no verified certificate)."""
        if identity is None:
            return NONE
        best = None
        for rule in self.rules:
            if rule.matches(identity, storage_id):
                if best is None or _LEVELS[rule.access] > _LEVELS[best]:
                    best = rule.access
        return self.default if best is None else best


def identity_of(transport: Any) -> Identity | None:
    """The verified client certificate of an asyncio transport, or None (no TLS, no cert)."""
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    if sslobj is None:
        return None
    der = sslobj.getpeercert(binary_form=True)
    if not der:
        return None
    decoded = sslobj.getpeercert() or {}
    names = tuple(
        value for rdn in decoded.get("subject", ()) for key, value in rdn
        if key == "commonName"
    )
    return Identity(names, hashlib.sha256(der).hexdigest())


def authorization_section(section: Any) -> Authorization:
    """ZConfig datatype of ``<authorization>``."""
    default = (section.default or NONE).lower()
    if default not in _LEVELS:
        raise ValueError(f"authorization default must be none, ro or rw, not {default!r}")
    rules = [r if isinstance(r, Rule) else parse_rule(r) for r in section.allow]
    return Authorization(rules, default)

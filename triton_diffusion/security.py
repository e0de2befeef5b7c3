"""Who may reach what: bind addresses, keys, and the tritonserver flags that enforce them.

Pure (no server, no network): the launcher, the gateway and the guard ask this module, and its
rules are unit-tested.

Closed by default:
- Everything binds loopback unless an address is asked for.
- Triton's model-repository, shared-memory, trace and logging APIs (load a model = run its
  Python as the server's user) need the admin key whenever one is set, and one must be set before
  Triton is reachable beyond loopback. Triton 2.51 enforces it itself (``--http-restricted-api``,
  ``--grpc-restricted-protocol``): HTTP header ``admin-key``, gRPC metadata
  ``triton-grpc-protocol-admin-key``.
- The gateway spends the GPU: it needs an API key unless it listens on loopback only.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from pathlib import Path
from typing import Mapping, Optional

LOOPBACK = "127.0.0.1"
# The admin APIs Triton's security guidance says to restrict where untrusted clients can reach:
# loading a model runs its code; shared memory maps host memory; trace and logging write files.
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_HEADER = "admin-key"
GRPC_ADMIN_METADATA = "triton-grpc-protocol-" + ADMIN_HEADER  # Triton prefixes gRPC restriction keys
# Keys travel as header values and on tritonserver's command line (its flag syntax uses ':', '=' and
# ','): a conservative alphabet, long enough not to be guessed.
_KEY = re.compile(r"[A-Za-z0-9._~+/-]{16,512}")


class SecurityError(ValueError):
    """A configuration that would expose something it must not; the message says what to do."""


def is_loopback(address: str) -> bool:
    """Whether binding ``address`` keeps a socket reachable from this host only."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable


def check_key(key: str, what: str) -> str:
    if not _KEY.fullmatch(key):
        raise SecurityError(f"the {what} must be 16 to 512 characters of A-Z a-z 0-9 . _ ~ + / - "
                            f"(got {len(key)} characters); e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return key


def load_keys(value: Optional[str], file: Optional[os.PathLike], what: str) -> tuple[str, ...]:
    """Keys from a value (comma-separated) or a file (one per line, ``#`` comments): several keys let an
    operator rotate them. Empty when neither is given; an empty or unreadable file is an error."""
    if value and file:
        raise SecurityError(f"give the {what} or a file holding it, not both")
    if file:
        path = Path(file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise SecurityError(f"cannot read the {what} file {path}: {exc.strerror}") from None
        keys = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
        if not keys:
            raise SecurityError(f"the {what} file {path} holds no key")
    else:
        keys = [part.strip() for part in (value or "").split(",") if part.strip()]
    return tuple(check_key(key, what) for key in keys)


def load_key(value: Optional[str], file: Optional[os.PathLike], what: str) -> Optional[str]:
    """One key (Triton compares against a single value)."""
    keys = load_keys(value, file, what)
    if len(keys) > 1:
        raise SecurityError(f"the {what} is one key; got {len(keys)}")
    return keys[0] if keys else None


def check_exposure(address: str, key: Optional[str], what: str, key_option: str) -> None:
    """Refuse to listen beyond loopback without a key."""
    if not is_loopback(address) and not key:
        raise SecurityError(
            f"{what} would listen on {address}, beyond loopback, with no key: anyone who reaches it could "
            f"{'load and run code as this user' if 'Triton' in what else 'spend the GPU'}. Set {key_option} "
            f"(or bind 127.0.0.1)")


def restriction_flags(admin_key: Optional[str]) -> list[str]:
    """tritonserver flags that put the admin APIs (HTTP and gRPC) behind the key; none without a key."""
    if not admin_key:
        return []
    apis = ",".join(RESTRICTED_APIS)
    return [f"--http-restricted-api={apis}:{ADMIN_HEADER}={admin_key}",
            f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={admin_key}"]


def admin_headers(admin_key: Optional[str], protocol: str = "http") -> dict[str, str]:
    """Headers (HTTP) or metadata (gRPC) that carry the admin key; empty without one."""
    if not admin_key:
        return {}
    return {GRPC_ADMIN_METADATA if protocol == "grpc" else ADMIN_HEADER: admin_key}


def key_matches(offered: Optional[str], keys: tuple[str, ...]) -> bool:
    """Constant-time comparison against every accepted key."""
    if not offered:
        return False
    found = False
    for key in keys:
        found |= secrets.compare_digest(offered.encode(), key.encode())
    return found


def redact(argv: list[str], secrets_: Mapping[str, str]) -> list[str]:
    """``argv`` for printing: every secret value replaced by ``<name>``."""
    out = []
    for arg in argv:
        for name, value in secrets_.items():
            if value:
                arg = arg.replace(value, f"<{name}>")
        out.append(arg)
    return out

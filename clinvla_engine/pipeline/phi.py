"""Salted hashes of the two identifiers a store may hold: PatientID and AccessionNumber.

- ``load_salt(path, *, create=True) -> bytes``: the salt from a file the user owns
  (``--salt-file``). Absent and create=True: 32 random bytes are written there as 64 hex
  characters, with mode 0600, atomically (another process creating it at the same moment wins and
  both use its salt). Unreadable, empty or shorter than 16 bytes: ``SaltError`` naming the file
  and the fix. A salt file readable by group or others gives a warning.
- ``hash_identifier(value, salt) -> str | None``: HMAC-SHA256(salt, value stripped, UTF-8),
  hex, first 32 characters (128 bits: collisions are out of reach for any archive); None for a
  blank or missing value, so "no id" never looks like an id.
- ``salt_fingerprint(salt) -> str``: an HMAC of a fixed text, stored beside hashes so that a
  later run can tell that the salt changed (the salt itself is never stored).

Without the salt the hashes cannot be reversed by hashing candidate ids (a plain SHA-256 of a
medical record number can: the space of ids is small). Keep the salt out of the store and out
of version control; losing it only means new hashes cannot be linked to old ones.
"""
from __future__ import annotations

import hmac
import os
import secrets
import stat
import warnings
from hashlib import sha256
from pathlib import Path
from typing import Any

HASH_HEX_CHARS = 32
MIN_SALT_BYTES = 16
_FINGERPRINT_TEXT = b"clinvla salt fingerprint v1"


class SaltError(RuntimeError):
    """The salt file cannot be used; the message names it and says what to do."""


def _create_salt_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_hex(32) + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link, not rename: it fails if another process created the file meanwhile, and then
        # that file (already complete, since it was linked into place) is the salt for both.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def load_salt(path: str | os.PathLike, *, create: bool = True) -> bytes:
    """The salt bytes from ``path`` (created with mode 0600 if absent and create is True)."""
    path = Path(path).expanduser()
    if not path.exists():
        if not create:
            raise SaltError(f"{path}: salt file not found; pass the --salt-file used for this store, "
                            "or a new path to create one")
        try:
            _create_salt_file(path)
        except OSError as exc:
            raise SaltError(f"{path}: cannot create the salt file ({exc}); pass --salt-file with a "
                            "path in a folder you can write") from None
    try:
        info = path.stat()
        data = path.read_bytes()
    except IsADirectoryError:
        raise SaltError(f"{path}: is a folder; --salt-file must name a file") from None
    except OSError as exc:
        raise SaltError(f"{path}: cannot read the salt file ({exc}); check that you own it and can "
                        "read it (chmod 600)") from None
    if not stat.S_ISREG(info.st_mode):
        raise SaltError(f"{path}: not a regular file; --salt-file must name a file")
    salt = data.strip()
    if len(salt) < MIN_SALT_BYTES:
        raise SaltError(f"{path}: salt file holds {len(salt)} bytes, fewer than {MIN_SALT_BYTES}; "
                        "delete it to have a new one created, or restore the original")
    if info.st_mode & 0o077:
        warnings.warn(f"{path}: salt file is readable by other users (mode {info.st_mode & 0o777:o}); "
                      "run chmod 600 on it", stacklevel=2)
    return salt


def hash_identifier(value: Any, salt: bytes) -> str | None:
    """HMAC-SHA256 of the stripped identifier, 32 hex chars; None for a blank or missing one."""
    if not isinstance(salt, (bytes, bytearray)) or len(salt) < MIN_SALT_BYTES:
        raise SaltError(f"salt must be at least {MIN_SALT_BYTES} bytes (use load_salt), "
                        f"got {type(salt).__name__}")
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    return hmac.new(bytes(salt), text.encode("utf-8"), sha256).hexdigest()[:HASH_HEX_CHARS]


def salt_fingerprint(salt: bytes) -> str:
    """A short tag that changes with the salt and reveals nothing about it."""
    return hmac.new(bytes(salt), _FINGERPRINT_TEXT, sha256).hexdigest()[:16]

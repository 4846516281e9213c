"""Expected digests of downloaded files: an item's ``sha256``, or its ``checksum`` written
as aria2's ``--checksum`` takes it, ``TYPE=HEX`` (``sha-512=9b71...``).

Pure: no trio, no I/O. The engine hashes what it writes with ``new_hasher(algorithm)`` and
compares the hex digest with ``Checksum.hex``. Hex digits are taken in either case and kept
in lower case, as ``hexdigest()`` gives them (sha256sum prints lower case, some sites
publish upper case; aria2 takes both).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import attrs

# aria2's names for the types (``aria2c --checksum``) -> hashlib's.
ALGORITHMS = {"sha-1": "sha1", "sha-256": "sha256", "sha-512": "sha512", "md5": "md5"}
_HEX = re.compile(r"[0-9a-fA-F]*")


@attrs.frozen
class Checksum:
    """The digest a file must have: ``algorithm`` one of ``ALGORITHMS`` (aria2's name),
    ``hex`` its lower-case hex digits."""

    algorithm: str
    hex: str

    @property
    def label(self) -> str:
        """How a mismatch names it: ``sha256`` (the item field's name) or aria2's type."""
        return "sha256" if self.algorithm == "sha-256" else self.algorithm

    def __str__(self) -> str:
        return f"{self.algorithm}={self.hex}"


def new_hasher(algorithm: str) -> Any:
    """A hashlib object for ``algorithm`` (aria2's name)."""
    # md5 and sha-1 check that a transfer arrived intact, not who made the file: a
    # FIPS-mode OpenSSL refuses them unless told so.
    return hashlib.new(ALGORITHMS[algorithm], usedforsecurity=False)


_HEX_DIGITS = {name: new_hasher(name).digest_size * 2 for name in ALGORITHMS}


def hex_digest(field: str, algorithm: str, value: str) -> str:
    """``value`` in lower case if it is a digest's hex digits for ``algorithm``; else
    ValueError naming ``field``."""
    digits = _HEX_DIGITS[algorithm]
    if len(value) != digits or not _HEX.fullmatch(value):
        raise ValueError(f"{field} must be {digits} hex digits for {algorithm}, not {value!r}")
    return value.lower()


def parse(text: str) -> Checksum:
    """``TYPE=HEX`` (the type in either case) as a Checksum; else ValueError saying what
    is wrong, starting with ``checksum``."""
    algorithm, equals, value = text.partition("=")
    algorithm = algorithm.lower()
    if not equals:
        raise ValueError(f"checksum must be TYPE=HEX, such as sha-256=..., not {text!r}")
    if algorithm not in ALGORITHMS:
        known = ", ".join(ALGORITHMS)
        raise ValueError(f"checksum type must be one of {known}, not {algorithm!r}")
    return Checksum(algorithm, hex_digest("checksum", algorithm, value))


def sha256(value: str) -> Checksum:
    """An item's ``sha256`` field as a Checksum; ValueError naming ``sha256`` if it is
    not 64 hex digits."""
    return Checksum("sha-256", hex_digest("sha256", "sha-256", value))

"""POSIX access ACLs in Linux's xattr form (``system.posix_acl_access``), and the few
ACLs statusd sets: a downloaded file that its reader may read, a user's download
directory that its reader may enter and list, and a way through the download directory.

The daemon owns every file and directory it writes, and an owner may set the ACL of its
own files without privileges, so no capability and no library is needed: the format is a
version-2 header and one little-endian ``(tag, perm, id)`` record per entry
(linux/posix_acl_xattr.h). Pure, apart from ``set_acl``/``get_acl``, which take an open
fd; nothing of trio or the rest of statusd.
"""

from __future__ import annotations

import enum
import errno
import functools
import operator
import os
import stat
import struct
from collections.abc import Iterable

import attrs

XATTR = "system.posix_acl_access"
VERSION = 2
UNDEFINED_ID = 0xFFFFFFFF  # the id of an entry that names nobody (the owner, the mask, ...)
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")

READ = 4
WRITE = 2
EXECUTE = 1


class Tag(enum.IntEnum):
    """Entry tags, in the order the kernel requires them."""

    USER_OBJ = 0x01
    USER = 0x02
    GROUP_OBJ = 0x04
    GROUP = 0x08
    MASK = 0x10
    OTHER = 0x20


@attrs.frozen(order=True)
class Entry:
    tag: Tag
    id: int
    perm: int


class ACLError(ValueError):
    """Bytes that are not an access ACL statusd can read."""


def owner(perm: int) -> Entry:
    return Entry(Tag.USER_OBJ, UNDEFINED_ID, perm)


def user(uid: int, perm: int) -> Entry:
    return Entry(Tag.USER, uid, perm)


def group_owner(perm: int) -> Entry:
    return Entry(Tag.GROUP_OBJ, UNDEFINED_ID, perm)


def mask(perm: int) -> Entry:
    return Entry(Tag.MASK, UNDEFINED_ID, perm)


def other(perm: int) -> Entry:
    return Entry(Tag.OTHER, UNDEFINED_ID, perm)


def encode(entries: Iterable[Entry]) -> bytes:
    """The xattr value; entries are sorted as the kernel wants them (tag, then id)."""
    records = b"".join(_ENTRY.pack(e.tag, e.perm, e.id) for e in sorted(entries))
    return _HEADER.pack(VERSION) + records


def decode(data: bytes) -> tuple[Entry, ...]:
    if len(data) < _HEADER.size or (len(data) - _HEADER.size) % _ENTRY.size:
        raise ACLError(f"acl of {len(data)} bytes is not a header and whole entries")
    (version,) = _HEADER.unpack_from(data)
    if version != VERSION:
        raise ACLError(f"acl version must be {VERSION}, not {version}")
    entries = []
    for tag, perm, id_ in _ENTRY.iter_unpack(data[_HEADER.size :]):
        try:
            entries.append(Entry(Tag(tag), id_, perm))
        except ValueError:
            raise ACLError(f"acl entry tag {tag:#x} is unknown") from None
    return tuple(entries)


def reader_file(reader: int) -> tuple[Entry, ...]:
    """A finished download: the daemon reads and writes, ``reader`` reads, nobody else
    (whatever the umask made of the group and other bits)."""
    return (owner(READ | WRITE), user(reader, READ), group_owner(0), mask(READ), other(0))


def reader_directory(reader: int) -> tuple[Entry, ...]:
    """A user's download directory (and those below it): ``reader`` lists and enters it,
    nobody else."""
    both = READ | EXECUTE
    return (owner(READ | WRITE | EXECUTE), user(reader, both), group_owner(0), mask(both), other(0))


def with_traverse(entries: Iterable[Entry], reader: int) -> tuple[Entry, ...]:
    """``entries`` plus search (``--x``) for ``reader``, who may then reach a directory
    below without listing this one. The mask is recomputed as ``setfacl`` does (the union
    of the group-class entries) so that no entry loses what it had."""
    entries = tuple(entries)
    kept = [e for e in entries if e.tag is not Tag.MASK and not _names(e, reader)]
    kept.append(user(reader, _union(e.perm for e in entries if _names(e, reader)) | EXECUTE))
    group_class = _union(e.perm for e in kept if e.tag in (Tag.USER, Tag.GROUP_OBJ, Tag.GROUP))
    return (*kept, mask(group_class))


def _union(perms: Iterable[int]) -> int:
    return functools.reduce(operator.or_, perms, 0)


def searchable_by(entries: Iterable[Entry], reader: int) -> bool:
    """Whether an ACL has an entry of ``reader``'s own that lets them search, unmasked."""
    entries = tuple(entries)
    masks = [e.perm for e in entries if e.tag is Tag.MASK]
    if masks and not masks[0] & EXECUTE:
        return False
    return any(_names(e, reader) and e.perm & EXECUTE for e in entries)


def _names(entry: Entry, reader: int) -> bool:
    return entry.tag is Tag.USER and entry.id == reader


def from_mode(mode: int) -> tuple[Entry, ...]:
    """The ACL that a file with no ACL of its own has: its mode bits."""
    bits = stat.S_IMODE(mode)
    return (owner(bits >> 6 & 7), group_owner(bits >> 3 & 7), other(bits & 7))


def get_acl(fd: int) -> tuple[Entry, ...]:
    """The access ACL of an open file (from its mode when it has none, or its filesystem
    has no ACLs)."""
    try:
        return decode(os.getxattr(fd, XATTR))
    except OSError as exc:
        if exc.errno != errno.ENODATA and not unsupported(exc):
            raise
    return from_mode(os.fstat(fd).st_mode)


def set_acl(fd: int, entries: Iterable[Entry]) -> None:
    """Set the access ACL of an open file; the kernel sets the mode bits to match.
    Raises OSError(EOPNOTSUPP) on a filesystem without ACLs."""
    os.setxattr(fd, XATTR, encode(entries))


def unsupported(exc: OSError) -> bool:
    return exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP)

"""Every blocking file operation of a download, and the worker threads that run them.

- **where**: a download writes inside one ``Directory``, an open directory fd, and names
  every file relative to it (``dir_fd=``), so a directory swapped for a symlink after the
  fd was opened cannot send a byte elsewhere. ``open_dest`` opens ``dest`` one component
  at a time with ``O_NOFOLLOW | O_DIRECTORY``.
- **whose**: an item's data goes to a part file that belongs to it alone,
  ``.NAME.<owner>.part`` (``part_name``), created with ``O_EXCL``; the owner is the task id
  and the item's index, so no two items ever share one. The finished part is hard-linked
  to a free final name (``os.link`` never replaces a file: NAME, NAME.1.ext, ...). A part
  that is opened again (a resume) must be a regular file linked nowhere else; one that is
  started again from zero is replaced by a new inode, never truncated, so a file someone
  linked to it keeps its bytes. Nothing here opens, truncates or removes a name that is
  not the caller's own part (or, after a crash, a final file linked to it).
- **who reads**: a task asked for by another uid than the daemon's has a reader
  (``Directory.reader``): its directories and finished files get a POSIX ACL entry for
  that uid alone (``acl.py``), whatever the umask, and its own directory below the
  download directory (``open_home_dest``) is entered by nobody else.
- **room**: a ``Reserve`` refuses a write that would leave less than ``min_free`` bytes
  free on the file system (``downloads.min_free_bytes``, kept for the daemon's journals),
  in the thread that writes: ``BelowReserve``, an ENOSPC of its own.
- **threads**: ``FILES`` runs file work in long-lived threads and fsyncs each directory
  once per batch of work (a group commit of the links). A large download's body is written
  and hashed by threads of its own (the engine's pipeline), with ``write_all`` and
  ``hash_data``.

Must not depend on trio beyond waking the caller, nor on the engine, the journal or the
RPC layer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import queue
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from statusd.downloads import acl, checksums, names

_T = TypeVar("_T")
_HASH_BLOCK = 1 << 20
MAX_NUMBERED = 10_000
PART_SUFFIX = ".part"
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REOPEN = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


class DestError(Exception):
    """``dest`` cannot be opened safely (a symlink, not a directory, or gone)."""


@attrs.frozen
class Directory:
    """An open directory that a download writes into; ``path`` is for messages and
    results only, never to open anything."""

    fd: int
    path: str
    reader: int | None = None  # the uid, other than the daemon's, that reads what is made here

    @classmethod
    def open(cls, path: Path | str) -> Directory:
        """Open a directory the caller trusts (created if missing), following symlinks."""
        text = os.fspath(path)
        try:
            fd = os.open(text, _DIRECTORY)
        except FileNotFoundError:
            os.makedirs(text, exist_ok=True)
            fd = os.open(text, _DIRECTORY)
        return cls(fd, text)

    def join(self, name: str) -> str:
        # Plain strings, not pathlib: Path objects cost more than the syscalls they name.
        return f"{self.path}/{name}"

    def close(self) -> None:
        os.close(self.fd)


def open_dest(
    root: Path | str, dest: str, *, create: bool = True, reader: int | None = None
) -> Directory:
    """Open ``dest`` below the download directory ``root`` without following a symlink.

    ``root`` is configuration and is opened as it is (it may itself be a symlink). A
    relative ``dest`` is walked from ``root``, an absolute one (an admin's dest outside the
    download directory) from ``/``, one component at a time with ``O_NOFOLLOW |
    O_DIRECTORY``, each relative to the fd of the one before; missing ones are created
    (``create``; with a ``reader``, each with that reader's directory ACL). Raises
    DestError naming the component that is a symlink or no directory.
    """
    if os.path.isabs(dest):
        return _walk(Directory(os.open("/", _DIRECTORY), "/", reader), dest, create)
    return _walk(attrs.evolve(Directory.open(root), reader=reader), dest, create)


def _walk(directory: Directory, dest: str, create: bool) -> Directory:
    """Open ``dest`` below ``directory`` (which this takes over and closes)."""
    path = directory.path.rstrip("/")
    try:
        for component in (part for part in dest.split("/") if part not in ("", ".")):
            if component == "..":
                raise DestError(f"dest {dest!r} must not contain '..'")
            path = f"{path}/{component}"
            fd = _open_component(directory.fd, component, path, create, directory.reader)
            directory.close()
            directory = Directory(fd, path, directory.reader)
    except BaseException:
        directory.close()
        raise
    return directory


def _open_component(
    parent: int, component: str, path: str, create: bool, reader: int | None = None
) -> int:
    flags = _DIRECTORY | os.O_NOFOLLOW
    try:
        return os.open(component, flags, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise DestError(f"dest directory {path} does not exist") from None
        made = True
        try:
            os.mkdir(component, 0o700 if reader is not None else 0o777, dir_fd=parent)
        except FileExistsError:
            made = False
        fd = _open_component(parent, component, path, create=False)
        if made and reader is not None:
            try:
                _set_acl(fd, acl.reader_directory(reader), path)
            except BaseException:
                os.close(fd)
                raise
        return fd
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise DestError(
                f"dest directory {path} is a symlink or not a directory; nothing was written"
            ) from None
        raise


# Adding one entry to the download directory's ACL reads it, then writes it: two tasks
# of two new users starting at once would otherwise each write back the ACL without the
# other's entry.
_TRAVERSE_LOCK = threading.Lock()


class ACLUnsupported(DestError):
    """The filesystem has no POSIX ACLs: a reader's files cannot be made theirs alone."""


def open_home_dest(
    root: Path | str, home: str, dest: str, reader: int, *, create: bool = True
) -> Directory:
    """Open ``dest`` (relative to the download directory ``root``) for a task whose files
    ``reader`` alone may read, ``dest`` being ``home`` (the reader's own directory,
    one component below ``root``) or inside it.

    The home directory is the daemon's, and its ACL is set again on every open: the reader
    lists and enters it, nobody else does (a directory of that name left by anyone else,
    or made with another uid's entry, is not taken as it is). ``root`` gets a search-only
    entry for the reader, so that the reader reaches the home without listing ``root``.
    Raises ``ACLUnsupported`` where the filesystem has no ACLs, before anything is made
    below ``root``.
    """
    if "/" in home or home in ("", ".", ".."):
        raise DestError(f"home {home!r} must be one directory name")
    if dest != home and not dest.startswith(f"{home}/"):
        raise DestError(f"dest {dest!r} must be inside {home!r}")
    directory = Directory.open(root)
    try:
        _grant_traverse(directory, reader)
        fd = _open_component(directory.fd, home, directory.join(home), create, reader)
    finally:
        directory.close()
    own = Directory(fd, f"{directory.path}/{home}", reader)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise DestError(f"{own.path} belongs to uid {info.st_uid}, not to the daemon")
        _set_acl(fd, acl.reader_directory(reader), own.path)
    except BaseException:
        own.close()
        raise
    return _walk(own, dest[len(home) :], create)


def _grant_traverse(directory: Directory, reader: int) -> None:
    with _TRAVERSE_LOCK:
        entries = acl.get_acl(directory.fd)
        if acl.searchable_by(entries, reader):
            return
        _set_acl(directory.fd, acl.with_traverse(entries, reader), directory.path)


def _set_acl(fd: int, entries: tuple[acl.Entry, ...], path: str) -> None:
    try:
        acl.set_acl(fd, entries)
    except OSError as exc:
        if acl.unsupported(exc):
            raise ACLUnsupported(
                f"{path} is on a filesystem without POSIX ACLs, which downloads for "
                "other users need (so that only they can read their files); nothing was written"
            ) from None
        raise


def share_with_reader(part: Part, directory: Directory) -> None:
    """Give the directory's reader (if any) read access to the part, and nobody else
    (OSError EOPNOTSUPP without ACLs: ``file_error`` says so)."""
    if directory.reader is not None:
        acl.set_acl(part.fd, acl.reader_file(directory.reader))


def part_name(name: str, owner: str) -> str:
    """``.NAME.<owner>.part``, with NAME cut (keeping its extension) so that it fits."""
    room = names.MAX_NAME_BYTES - len(f"..{owner}{PART_SUFFIX}".encode())
    fitted = names.safe_filename(name, max_bytes=room) or "download"
    return f".{fitted}.{owner}{PART_SUFFIX}"


def own_parts(directory: Directory, prefix: str) -> dict[int, str]:
    """The part files in ``directory`` whose owner is ``<prefix>-<index>`` (a task's
    items: ``part_name``), by index. A crash can leave one that its caller never
    journalled: a small file's part is created and linked in one hop, unreported."""
    found: dict[int, str] = {}
    start = f"{prefix}-"
    # A descriptor of its own, as in ``_linked_name``.
    fd = os.open(".", _DIRECTORY, dir_fd=directory.fd)
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                index = _owner_index(entry.name, start)
                if index is not None:
                    found[index] = entry.name
    finally:
        os.close(fd)
    return found


def _owner_index(name: str, start: str) -> int | None:
    if not (name.startswith(".") and name.endswith(PART_SUFFIX)):
        return None
    owner = name[: -len(PART_SUFFIX)].rpartition(".")[2]
    if not owner.startswith(start):
        return None
    index = owner[len(start) :]
    # As part_name wrote it: ASCII digits, no leading zeros.
    if not (index.isascii() and index.isdigit()) or str(int(index)) != index:
        return None
    return int(index)


def numbered(base: str, n: int) -> str:
    return base if n == 0 else names.numbered(base, n, max_bytes=names.MAX_NAME_BYTES)


@attrs.define
class Part:
    """An item's own part file, open for writing at ``position``; ``fd`` is -1 once closed."""

    fd: int
    hasher: Any  # a hashlib object, or None when nobody asked for the digest
    position: int

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


@attrs.frozen
class PartOnDisk:
    """What a resume finds: the size of a part it may append to (None: none, or one that
    is not a plain file of ours with no other link, which is replaced, never written
    into) and, when a crash came between linking the part to its final name and
    journalling that, the final name."""

    size: int | None
    final: str | None = None


@attrs.frozen
class Finished:
    final: str | None  # None: the digest did not match and the part is gone
    digest: str | None


def inspect_part(directory: Directory, part: str) -> PartOnDisk:
    try:
        info = os.stat(part, dir_fd=directory.fd, follow_symlinks=False)
    except FileNotFoundError:
        return PartOnDisk(None)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        return PartOnDisk(None)
    if info.st_nlink > 1:
        final = _linked_name(directory, part, info)
        return PartOnDisk(None) if final is None else PartOnDisk(info.st_size, final)
    return PartOnDisk(info.st_size)


def _linked_name(directory: Directory, part: str, info: os.stat_result) -> str | None:
    """The visible name in ``directory`` that is a hard link to the part, if any (the inode
    number comes with the directory entry, so this costs one pass over the listing)."""
    # A descriptor of its own: one that shares the directory fd's read position with
    # another thread's listing would skip entries.
    fd = os.open(".", _DIRECTORY, dir_fd=directory.fd)
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if (
                    entry.name != part
                    and not entry.name.startswith(".")
                    and entry.inode() == info.st_ino
                ):
                    return entry.name
    finally:
        os.close(fd)
    return None


def _hasher(hashing: str | None) -> Any:
    return None if hashing is None else checksums.new_hasher(hashing)


def create_part(directory: Directory, part: str, hashing: str | None) -> Part:
    """Create the item's part (O_EXCL: a file already there is nobody's to reuse), hashed
    with ``hashing`` (a ``checksums.ALGORITHMS`` name; None: not hashed)."""
    fd = os.open(part, _CREATE, 0o644, dir_fd=directory.fd)
    return Part(fd, _hasher(hashing), 0)


def open_part(directory: Directory, part: str, start: int, hashing: str | None) -> Part:
    """The item's part, ready for writing at ``start``: from zero it is a new inode (the
    old one unlinked, never truncated); else the existing file, which must be a regular
    file of ours with no other link, hashed up to ``start`` with ``hashing``, if any."""
    if start == 0:
        unlink_quietly(directory, part)
        return create_part(directory, part, hashing)
    fd = os.open(part, _REOPEN, dir_fd=directory.fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_uid != os.geteuid():
            raise OSError(errno.EEXIST, "part file is not this item's own", directory.join(part))
        hasher = _hasher(hashing)
        if hasher is not None:
            _hash_prefix(fd, start, hasher, directory.join(part))
        os.ftruncate(fd, start)
        os.lseek(fd, start, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return Part(fd, hasher, start)


def _hash_prefix(fd: int, length: int, hasher: Any, path: str) -> None:
    position = 0
    while position < length:
        block = os.pread(fd, min(_HASH_BLOCK, length - position), position)
        if not block:
            raise OSError(errno.EIO, "partial file shorter than expected", path)
        hasher.update(block)
        position += len(block)


class BelowReserve(OSError):
    """Writing would leave less free space than the reserve kept for the daemon's journals.
    An ENOSPC, so every path that handles a full disk handles this one the same way."""

    def __init__(self, min_free: int, free: int, needed: int) -> None:
        super().__init__(
            errno.ENOSPC,
            f"no space left above the reserve of {_size(min_free)} for the daemon's journals"
            f" (downloads.min_free_bytes): {_size(free)} free, {_size(needed)} to write",
        )


# The most written between two looks at the free space: when something else fills the
# disk meanwhile, downloads eat at most this much of the reserve.
RESERVE_SLACK = 16 << 20


class Reserve:
    """Free space that writes leave on one file system: ``min_free`` bytes
    (``downloads.min_free_bytes``). One is shared by every write to that file system, from
    any worker thread.

    ``fstatvfs`` is asked again only once the writes since the last look could have used
    half of the room then left above the reserve, or ``RESERVE_SLACK``: a 16 KiB file costs
    no system call, a large one a look per receive buffer as the room runs out. The free
    space counted is ``f_bavail``, what an unprivileged writer may use: a daemon running as
    root could also take the blocks ext4 keeps for root, but the reserve must hold
    whoever runs it.
    """

    def __init__(self, min_free: int) -> None:
        if min_free < 1:
            raise ValueError(f"min_free must be >= 1, not {min_free}")
        self.min_free = min_free
        self._lock = threading.Lock()
        self._credit = 0  # bytes that may be written before the next look

    def claim(self, fd: int, size: int, rest: int) -> None:
        """Let ``size`` bytes be written to ``fd``'s file system now, ``rest`` (at least
        ``size``: the rest of the file, when its length is known) still to come; or raise
        BelowReserve when ``rest`` does not fit above the reserve."""
        with self._lock:
            if rest <= self._credit:
                self._credit -= size
                return
            info = os.fstatvfs(fd)
            free = info.f_bavail * info.f_frsize
            room = free - self.min_free
            if rest > room:
                self._credit = 0
                raise BelowReserve(self.min_free, free, rest)
            self._credit = min((room - rest) // 2, RESERVE_SLACK)


def write_claimed(fd: int, data: memoryview, *, reserve: Reserve, rest: int) -> None:
    """``write_all`` once ``reserve`` lets ``data`` be written, ``rest`` bytes to come."""
    reserve.claim(fd, len(data), rest)
    write_all(fd, data)


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            value = count / scale
            shown = f"{value:.0f}" if value >= 10 else f"{value:.1f}".removesuffix(".0")
            return f"{shown} {unit}"
    return f"{count} bytes"


def write_data(part: Part, data: memoryview, reserve: Reserve | None = None) -> None:
    if reserve is not None:
        reserve.claim(part.fd, len(data), len(data))
    if part.hasher is not None:
        part.hasher.update(data)
    write_all(part.fd, data)
    part.position += len(data)


def hash_data(hasher: Any, data: memoryview) -> None:
    if hasher is not None:
        hasher.update(data)


def write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def finish(
    part: Part | None,
    data: memoryview,
    directory: Directory,
    part_file: str,
    base: str,
    expected: str | None,
    hashing: str | None,
    keep_part: bool,
    reserve: Reserve | None = None,
) -> Finished:
    """Write the last batch (creating the part first if there is none; ``reserve`` must
    let it be written), fsync, check the digest (``expected``: the hex digest of
    ``hashing``), link the part to a free final name and (unless ``keep_part``) remove
    the part. The pool fsyncs the directory before anyone hears of it. A part that fails
    here is removed: it is the caller's own."""
    if part is None:
        part = create_part(directory, part_file, hashing)
    try:
        try:
            write_data(part, data, reserve)
            if directory.reader is None:
                os.fdatasync(part.fd)  # the data and its size; mtime alone is not worth a flush
            else:
                # Before the link, so that the final name is never readable by the wrong
                # uid; fsync, not fdatasync, so that a crash cannot lose the ACL.
                share_with_reader(part, directory)
                os.fsync(part.fd)
        finally:
            part.close()
        digest: str | None = None if part.hasher is None else part.hasher.hexdigest()
        if expected is not None and digest != expected:
            unlink_quietly(directory, part_file)
            return Finished(None, digest)
        final = link_free(directory, part_file, base)
    except OSError:
        unlink_quietly(directory, part_file)
        raise
    if not keep_part:
        os.unlink(part_file, dir_fd=directory.fd)
    return Finished(final, digest)


class _NumberHints:
    """Where the search for a free BASE.n.ext last ended, per directory and base name.

    Without it a batch of N items that share a name tries 1 + 2 + ... + N links (2,000
    items named ``gone``: two million failed links, 84 files a second). A hint is only a
    place to start: BASE itself is always tried first (a user who deleted it gets it back),
    and a stale hint costs a few failed links more, never a replaced file. Bounded, and
    shared by the file threads, hence the lock."""

    def __init__(self, most: int = 1024) -> None:
        self._most = most
        self._next: dict[tuple[int, int, str], int] = {}
        self._lock = threading.Lock()

    def start(self, key: tuple[int, int, str]) -> int:
        with self._lock:
            return self._next.get(key, 1)

    def ended(self, key: tuple[int, int, str], n: int) -> None:
        with self._lock:
            self._next.pop(key, None)
            self._next[key] = n + 1
            if len(self._next) > self._most:
                del self._next[next(iter(self._next))]  # the least recently ended


_hints = _NumberHints()


def link_free(directory: Directory, part_file: str, base: str) -> str:
    """Hard-link the part as BASE, or BASE.1.ext, ...: ``link`` never replaces a file."""
    if _link(directory, part_file, base):
        return base
    found = os.fstat(directory.fd)
    key = (found.st_dev, found.st_ino, base)
    start = min(max(_hints.start(key), 1), MAX_NUMBERED)
    # From the hint to the end, then the numbers below it that may have been freed.
    for n in itertools.chain(range(start, MAX_NUMBERED), range(1, start)):
        final = numbered(base, n)
        if _link(directory, part_file, final):
            _hints.ended(key, n)
            return final
    raise FileExistsError(errno.EEXIST, f"no free name for {base}", directory.path)


def _link(directory: Directory, part_file: str, final: str) -> bool:
    try:
        os.link(
            part_file,
            final,
            src_dir_fd=directory.fd,
            dst_dir_fd=directory.fd,
            follow_symlinks=False,
        )
    except FileExistsError:
        return False
    return True


def hash_file(directory: Directory, part: str) -> str:
    """The sha256 of the whole part."""
    fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory.fd)
    try:
        hasher = hashlib.sha256()
        _hash_prefix(fd, os.fstat(fd).st_size, hasher, directory.join(part))
        return hasher.hexdigest()
    finally:
        os.close(fd)


def settle_done(directory: Directory, name: str, part: str | None) -> int | None:
    """The size of finished NAME (None if it is gone), removing the item's part if it is
    still linked to it (a crash after the journal had ``done``, before the part went).
    A state from before parts were owned (``part`` None) names its part ``NAME.part``;
    that goes only when it is a link to NAME itself, which proves it was this item's."""
    try:
        final = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    part = f"{name}{PART_SUFFIX}" if part is None else part
    with contextlib.suppress(FileNotFoundError):
        held = os.stat(part, dir_fd=directory.fd, follow_symlinks=False)
        if (held.st_ino, held.st_dev) == (final.st_ino, final.st_dev):
            os.unlink(part, dir_fd=directory.fd)
    return final.st_size


def unlink_quietly(directory: Directory, name: str) -> bool:
    try:
        os.unlink(name, dir_fd=directory.fd)
    except FileNotFoundError:
        return False
    return True


def file_size(directory: Directory, name: str) -> int | None:
    try:
        return os.stat(name, dir_fd=directory.fd, follow_symlinks=False).st_size
    except FileNotFoundError:
        return None


def file_error(exc: OSError, path: str) -> str:
    if isinstance(exc, BelowReserve):
        return f"{exc.strerror} into {path}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device writing {path}"
    if acl.unsupported(exc):
        return f"cannot give {path} to its reader alone: the filesystem has no POSIX ACLs"
    reason = exc.strerror or str(exc)
    return f"cannot write {path}: {reason[:1].lower()}{reason[1:]}"


# --- worker threads ----------------------------------------------------------------------


class _FileWork:
    """One call handed to a worker thread, and the task waiting for it."""

    __slots__ = ("args", "directory", "error", "result", "task", "token", "work")

    def __init__(
        self, work: Callable[..., Any], args: tuple[Any, ...], directory: int | None
    ) -> None:
        self.work = work
        self.args = args
        self.directory = directory
        self.task = trio.lowlevel.current_task()
        self.token = trio.lowlevel.current_trio_token()
        self.result: Any = None
        self.error: BaseException | None = None


class ThreadPool:
    """Long-lived worker threads fed from one queue, for blocking file work.

    A worker takes every piece of work waiting (up to ``max_batch``), runs them, fsyncs
    once each directory that the batch asked for (a group commit of their links), and
    wakes the event loop once for the whole batch. With 16 small downloads at a time this
    ran 2.3x the files/s of one ``trio.to_thread.run_sync`` per call on the benchmark
    machine (docs/bench-downloads.md): the per-call thread hand-off and wake-up cost as
    much as the HTTP exchange itself. Like ``to_thread.run_sync``, work is never
    abandoned: a cancelled caller waits for it to finish (milliseconds), so no file is
    left half-handled.
    """

    def __init__(self, name: str, threads: int, max_batch: int) -> None:
        self._name = name
        self._threads = threads
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_FileWork] = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._after_fork)

    async def run(
        self, work: Callable[..., _T], *args: Any, sync_directory: Directory | None = None
    ) -> _T:
        """``work(*args)`` in a worker thread; with ``sync_directory``, the directory is
        fsynced after the work and before the result is returned."""
        self._start()
        item = _FileWork(work, args, None if sync_directory is None else sync_directory.fd)
        self._queue.put(item)
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        error, item.error = item.error, None
        if error is not None:
            raise error
        result: _T = item.result
        return result

    def _start(self) -> None:
        if self._started:
            return
        with self._lock:
            if not self._started:
                for n in range(self._threads):
                    thread = threading.Thread(
                        target=self._work, name=f"statusd-{self._name}-{n}", daemon=True
                    )
                    thread.start()
                self._started = True

    def _work(self) -> None:
        while True:
            batch = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < self._max_batch:
                    batch.append(self._queue.get_nowait())
            for item in batch:
                try:
                    item.result = item.work(*item.args)
                except BaseException as exc:
                    item.error = exc
            self._sync_directories(batch)
            by_token: dict[trio.lowlevel.TrioToken, list[_FileWork]] = {}
            for item in batch:
                by_token.setdefault(item.token, []).append(item)
            for token, done in by_token.items():
                # A run that ended (a crash elsewhere) has nobody left to wake; the
                # worker must live on for the next one.
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(_wake, done)

    def _after_fork(self) -> None:
        """A forked child has none of the parent's threads: start afresh on first use."""
        self._queue = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()

    @staticmethod
    def _sync_directories(batch: list[_FileWork]) -> None:
        directories = {item.directory for item in batch if item.directory is not None}
        for directory in directories:
            if not any(item.directory == directory and item.error is None for item in batch):
                continue
            try:
                os.fsync(directory)
            except OSError as exc:
                for item in batch:
                    if item.directory == directory and item.error is None:
                        item.error = exc


def _wake(batch: list[_FileWork]) -> None:
    for item in batch:
        trio.lowlevel.reschedule(item.task)


# File creation, small files and links; batched, with directory fsyncs shared.
FILES = ThreadPool("files", threads=4, max_batch=64)


async def in_thread(work: Callable[..., _T], *args: Any) -> _T:
    return await FILES.run(work, *args)


class BufferPool:
    """Receive buffers, reused: a fresh 1 MiB bytearray costs a zero-fill and 256 page
    faults, which at 16 small files at a time was a visible share of the time."""

    def __init__(self, max_idle_bytes: int) -> None:
        self._max_idle_bytes = max_idle_bytes
        self._idle_bytes = 0
        self._free: dict[int, list[bytearray]] = {}

    def take(self, size: int) -> bytearray:
        free = self._free.get(size)
        if free:
            self._idle_bytes -= size
            return free.pop()
        return bytearray(size)

    def give(self, buffer: bytearray) -> None:
        if self._idle_bytes + len(buffer) <= self._max_idle_bytes:
            self._free.setdefault(len(buffer), []).append(buffer)
            self._idle_bytes += len(buffer)


BUFFERS = BufferPool(max_idle_bytes=64 << 20)

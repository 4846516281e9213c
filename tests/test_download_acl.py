"""Who can read a download: the ACL encoder as a table, a user's own directory on real
files, and a real daemon process (as root) downloading for ``nobody`` from a real HTTP
server, under the unit's UMask=0077 and a plain 0022: nobody reads the file, a third uid
(65533, no passwd entry needed) does not, a relative ``dest`` lands in
``download_dir/nobody/``, a ``dest`` that leaves it is refused, a resume after SIGKILL
keeps the directory and the ACL, and a filesystem without ACLs (ramfs) fails the task
with nothing written.

The ACLs are read back with ``os.getxattr`` and the module's own decoder (no ``getfacl``).
"""

from __future__ import annotations

import errno
import grp
import os
import random
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from statusd.downloads import acl, files
from statusd.downloads.acl import (
    EXECUTE,
    READ,
    WRITE,
    ACLError,
    Entry,
    group_owner,
    mask,
    other,
    owner,
    user,
)
from statusd.downloads.files import ACLUnsupported, DestError, open_home_dest
from tests.conftest import NOBODY_GID, NOBODY_UID, DaemonProcess, RawClient, blocking_call, run_as
from tests.http_servers import HTTPTestServer, hang_after_head, http_server, sequence, serve_data
from tests.processes import finished, kill, start, until

__all__ = ["http_server"]

THIRD_UID = THIRD_GID = 65533
DATA = random.Random(20).randbytes(200_000)
BIG = random.Random(21).randbytes(3 << 20)
BIG_SENT = 1_300_000  # more than one receive buffer (1 MiB): the part is on disk

# --- the encoder ----------------------------------------------------------------------

# Expected bytes written out by hand from linux/posix_acl_xattr.h: a u32 version 2, then
# (u16 tag, u16 perm, u32 id) per entry, little-endian, sorted by tag and then id.
ENCODED = [
    (
        acl.reader_file(65534),
        "02000000"
        "01000600ffffffff"  # user::rw-
        "02000400feff0000"  # user:65534:r--
        "04000000ffffffff"  # group::---
        "10000400ffffffff"  # mask::r--
        "20000000ffffffff",  # other::---
    ),
    (
        acl.reader_directory(1000),
        "02000000"
        "01000700ffffffff"  # user::rwx
        "02000500e8030000"  # user:1000:r-x
        "04000000ffffffff"
        "10000500ffffffff"  # mask::r-x
        "20000000ffffffff",
    ),
    (  # given out of order: encoded in the kernel's order, named users by id
        (other(4), user(7, 1), mask(5), user(3, 4), group_owner(5), owner(7)),
        "02000000"
        "01000700ffffffff"
        "0200040003000000"
        "0200010007000000"
        "04000500ffffffff"
        "10000500ffffffff"
        "20000400ffffffff",
    ),
    ((), "02000000"),
]


@pytest.mark.parametrize(("entries", "expected"), ENCODED)
def test_encode_gives_the_kernels_bytes(entries: tuple[Entry, ...], expected: str) -> None:
    assert acl.encode(entries).hex() == expected
    assert acl.decode(bytes.fromhex(expected)) == tuple(sorted(entries))


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "acl of 0 bytes is not a header and whole entries"),
        (bytes.fromhex("0200000001000600"), "acl of 8 bytes is not a header and whole entries"),
        (bytes.fromhex("01000000"), "acl version must be 2, not 1"),
        (bytes.fromhex("0200000040000400ffffffff"), "acl entry tag 0x40 is unknown"),
    ],
)
def test_decode_refuses_what_is_not_an_acl(data: bytes, problem: str) -> None:
    with pytest.raises(ACLError) as raised:
        acl.decode(data)
    assert str(raised.value) == problem


RX = READ | EXECUTE
RWX = READ | WRITE | EXECUTE
TRAVERSE = [
    # a 0700 directory with no ACL (UMask=0077): the reader may search, nothing more
    (acl.from_mode(0o40700), {owner(RWX), group_owner(0), other(0), user(5, EXECUTE), mask(1)}),
    # 0755: the mask keeps the group's r-x
    (acl.from_mode(0o755), {owner(RWX), group_owner(RX), other(RX), user(5, EXECUTE), mask(RX)}),
    # the reader's own entry gains x and keeps r; another user keeps rwx through the mask
    (
        (owner(RWX), user(5, READ), user(9, RWX), group_owner(0), mask(READ), other(0)),
        {owner(RWX), user(5, RX), user(9, RWX), group_owner(0), mask(RWX), other(0)},
    ),
]


@pytest.mark.parametrize(("entries", "expected"), TRAVERSE)
def test_with_traverse_adds_search_for_the_reader_alone(
    entries: tuple[Entry, ...], expected: set[Entry]
) -> None:
    granted = acl.with_traverse(entries, 5)
    assert set(granted) == expected
    assert len(granted) == len(expected)
    assert acl.searchable_by(granted, 5)


@pytest.mark.parametrize(
    ("entries", "searchable"),
    [
        (acl.from_mode(0o755), False),  # "other" lets them through, but that is not theirs
        ((owner(RWX), user(5, EXECUTE), group_owner(0), mask(EXECUTE), other(0)), True),
        ((owner(RWX), user(5, EXECUTE), group_owner(0), mask(READ), other(0)), False),
        ((owner(RWX), user(6, EXECUTE), group_owner(0), mask(EXECUTE), other(0)), False),
        ((owner(RWX), user(5, READ), group_owner(0), mask(RX), other(0)), False),
    ],
)
def test_searchable_by_needs_an_unmasked_entry_of_the_readers_own(
    entries: tuple[Entry, ...], searchable: bool
) -> None:
    assert acl.searchable_by(entries, 5) is searchable


def test_from_mode_is_the_acl_a_file_without_one_has() -> None:
    assert acl.from_mode(0o100640) == (owner(READ | WRITE), group_owner(READ), other(0))


# --- a user's own directory, on real files --------------------------------------------


def acl_of(path: Path) -> tuple[Entry, ...]:
    return tuple(sorted(acl.decode(os.getxattr(path, acl.XATTR, follow_symlinks=False))))


def test_open_home_dest_lets_the_reader_alone_into_their_directory(tmp_path: Path) -> None:
    root = tmp_path / "downloads"
    directory = open_home_dest(root, "alice", "alice/a/b", 4242)
    try:
        assert directory.reader == 4242
        assert directory.path == f"{root}/alice/a/b"
        assert os.path.samestat(os.fstat(directory.fd), os.stat(root / "alice/a/b"))
    finally:
        directory.close()
    assert acl.searchable_by(acl_of(root), 4242)
    assert user(4242, EXECUTE) in acl_of(root)  # search only: the reader cannot list root
    for made in ("alice", "alice/a", "alice/a/b"):
        assert acl_of(root / made) == tuple(sorted(acl.reader_directory(4242))), made
        assert (root / made).stat().st_mode & 0o7777 == 0o750


def test_a_home_is_given_to_its_current_reader_only(tmp_path: Path) -> None:
    """A directory of that name made for another uid (a renamed user, a name that is
    another's uid) is taken back: its ACL names the new reader alone."""
    root = tmp_path / "downloads"
    open_home_dest(root, "bob", "bob", 4242).close()
    open_home_dest(root, "bob", "bob", 4243).close()
    assert acl_of(root / "bob") == tuple(sorted(acl.reader_directory(4243)))
    assert acl.searchable_by(acl_of(root), 4242)
    assert acl.searchable_by(acl_of(root), 4243)


def test_a_dest_outside_the_home_or_a_home_that_is_a_path_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "downloads"
    for home, dest in (("alice", "bob/x"), ("alice", "alicex"), ("a/b", "a/b"), ("..", "..")):
        with pytest.raises(DestError):
            open_home_dest(root, home, dest, 4242)
    with pytest.raises(DestError, match=r"must not contain '\.\.'"):
        open_home_dest(root, "alice", "alice/../bob", 4242)
    assert not (root / "bob").exists()


def test_a_home_owned_by_another_uid_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"giving a directory away needs root: running as uid {os.geteuid()}")
    root = tmp_path / "downloads"
    (root / "alice").mkdir(parents=True)
    os.chown(root / "alice", THIRD_UID, THIRD_GID)
    with pytest.raises(DestError, match=f"belongs to uid {THIRD_UID}, not to the daemon"):
        open_home_dest(root, "alice", "alice", 4242)
    assert os.listxattr(root / "alice") == []


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A ramfs, which has no xattrs and so no ACLs (tmpfs has them)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(f"a filesystem without ACLs needs a ramfs mount: uid {os.geteuid()}")
    mountpoint = tmp_path / "ramfs"
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "ramfs", "ramfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a ramfs here: {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_filesystem_without_acls_is_refused_before_anything_is_made(ramfs: Path) -> None:
    root = ramfs / "downloads"
    with pytest.raises(ACLUnsupported, match="filesystem without POSIX ACLs"):
        open_home_dest(root, "alice", "alice/a", 4242)
    assert os.listdir(root) == []


def test_a_part_whose_acl_cannot_be_set_is_removed_not_linked(ramfs: Path) -> None:
    """Without ACLs a reader's file would be the daemon's alone, or everyone's: it fails,
    and neither the part nor a final name is left."""
    directory = files.Directory.open(ramfs)
    try:
        reader = attrs.evolve(directory, reader=4242)
        part = files.create_part(reader, ".a.bin.t-0.part", hashing=None)
        with pytest.raises(OSError, match="Operation not supported") as raised:
            files.finish(
                part, memoryview(b"data"), reader, ".a.bin.t-0.part", "a.bin", None, None, False
            )
    finally:
        directory.close()
    assert acl.unsupported(raised.value)
    assert os.listdir(ramfs) == []
    assert files.file_error(raised.value, f"{ramfs}/a.bin") == (
        f"cannot give {ramfs}/a.bin to its reader alone: the filesystem has no POSIX ACLs"
    )


# --- a real daemon, a real second and third uid ---------------------------------------


def shared_config(directory: Path) -> Path:
    """nobody's group may reach the socket."""
    path = directory / "statusd.toml"
    path.write_text(f'socket_group = "{grp.getgrgid(NOBODY_GID).gr_name}"\n')
    return path


@pytest.fixture
async def start_shared(daemon_process: Any, root_only: None) -> AsyncIterator[Any]:
    """``await start_shared(download_dir, umask, process=None)``: a daemon process (a new
    one, or ``process`` again) that nobody may reach, and a root client of it; every
    client is closed whatever the test asserts."""
    clients: list[RawClient] = []

    async def _start(
        download_dir: Path, umask: int, process: DaemonProcess | None = None
    ) -> tuple[DaemonProcess, RawClient]:
        process = process or daemon_process()
        process.umask = umask
        config = shared_config(process.directory)
        flags = ("--config", str(config), "--download-dir", str(download_dir))
        clients.append(await start(process, *flags))
        return process, clients[-1]

    yield _start
    for client in clients:
        await trio.aclose_forcefully(client.stream)


def as_uid(uid: int, action: Any) -> Any:
    return run_as(uid, uid, action)


def read_or_errno(*paths: str) -> Any:
    """What a uid gets opening each path: the bytes' length and head, or the errno."""

    def read() -> list[Any]:
        outcomes: list[Any] = []
        for path in paths:
            try:
                with open(path, "rb") as file:
                    data = file.read()
                outcomes.append([len(data), data[:16].hex()])
            except OSError as exc:
                outcomes.append(errno.errorcode[exc.errno or 0])
        return outcomes

    return read


async def download_as_nobody(process: DaemonProcess, **params: Any) -> dict[str, Any]:
    socket = process.socket

    def ask() -> dict[str, Any]:
        answer: dict[str, Any] = blocking_call(socket, "tasks.download", params)
        return answer

    answer: dict[str, Any] = await trio.to_thread.run_sync(as_uid, NOBODY_UID, ask)
    return answer


def expect(data: bytes) -> list[Any]:
    return [len(data), data[:16].hex()]


@pytest.mark.parametrize("umask", [0o077, 0o022], ids=["umask-0077", "umask-0022"])
async def test_nobody_reads_their_download_and_a_third_uid_does_not(
    start_shared: Any, http_server: HTTPTestServer, short_tmp: Path, umask: int
) -> None:
    downloads = short_tmp / "downloads"
    url = http_server.route("/report.pdf", serve_data(DATA))
    process, client = await start_shared(downloads, umask)
    plain = await download_as_nobody(process, urls=[url])
    deeper = await download_as_nobody(process, urls=[url], dest="sub/deeper")
    paths = []
    for answer in (plain, deeper):
        task = await finished(client, answer["result"]["task_id"])
        assert task["status"] == "completed", task
        paths.append(task["result"]["items"][0]["path"])
    assert paths == [f"{downloads}/nobody/report.pdf", f"{downloads}/nobody/sub/deeper/report.pdf"]

    # The third uid may pass a directory of its own to a hard link of the file: only the
    # file's ACL stands between it and the bytes.
    peek = short_tmp / "peek"
    peek.mkdir(mode=0o755)
    os.link(paths[0], peek / "report.pdf")
    readers = read_or_errno(*paths)
    assert await trio.to_thread.run_sync(as_uid, NOBODY_UID, readers) == [expect(DATA)] * 2
    third = read_or_errno(*paths, str(peek / "report.pdf"))
    assert await trio.to_thread.run_sync(as_uid, THIRD_UID, third) == ["EACCES"] * 3

    for path in paths:
        assert acl_of(Path(path)) == tuple(sorted(acl.reader_file(NOBODY_UID)))
        assert os.stat(path).st_mode & 0o7777 == 0o640  # the group bits show the mask
    assert acl_of(downloads / "nobody") == tuple(sorted(acl.reader_directory(NOBODY_UID)))
    assert acl.searchable_by(acl_of(downloads), NOBODY_UID)
    assert not acl.searchable_by(acl_of(downloads), THIRD_UID)


async def test_a_dest_that_leaves_the_callers_directory_is_refused(
    start_shared: Any, http_server: HTTPTestServer, short_tmp: Path
) -> None:
    downloads = short_tmp / "downloads"
    url = http_server.route("/a.bin", serve_data(DATA))
    process, client = await start_shared(downloads, 0o077)
    (downloads / "root-only").mkdir(parents=True)
    for dest in ("..", "../root-only", "x/../../root-only", str(downloads), "/tmp", "/"):
        answer = await download_as_nobody(process, urls=[url], dest=dest)
        assert answer["error"]["code"] == -32002, (dest, answer)
        assert answer["error"]["message"] == (
            f"dest must be inside your download directory {downloads}/nobody"
        )
        assert answer["error"]["data"] == {"field": "dest", "download_dir": f"{downloads}/nobody"}
    # An absolute dest inside the caller's own directory is theirs.
    inside = await download_as_nobody(process, urls=[url], dest=f"{downloads}/nobody/in")
    task = await finished(client, inside["result"]["task_id"])
    assert task["result"]["items"][0]["path"] == f"{downloads}/nobody/in/a.bin"
    assert len(http_server.requests_for("/a.bin")) == 1  # the refused ones asked nothing
    assert sorted(os.listdir(downloads)) == ["nobody", "root-only"]
    assert os.listdir(downloads / "root-only") == []


async def test_a_task_resumed_after_sigkill_keeps_its_directory_and_acl(
    start_shared: Any, http_server: HTTPTestServer, short_tmp: Path
) -> None:
    downloads = short_tmp / "downloads"
    url = http_server.route("/big.iso", sequence(hang_after_head(BIG, BIG_SENT), serve_data(BIG)))
    process, client = await start_shared(downloads, 0o077)
    task_id = (await download_as_nobody(process, urls=[url]))["result"]["task_id"]
    home = downloads / "nobody"

    async def part_on_disk() -> bool:
        parts = [p for p in home.glob(".*.part") if p.stat().st_size > 0] if home.exists() else []
        return bool(parts)

    await until(part_on_disk)
    await kill(process, client)
    process, client = await start_shared(downloads, 0o077, process)
    task = await finished(client, task_id)
    assert task["status"] == "completed", task
    path = task["result"]["items"][0]["path"]
    assert path == f"{home}/big.iso"
    # It resumed (a Range request) into the part it had, in nobody's directory.
    assert http_server.requests_for("/big.iso")[1].headers.get("range") is not None
    assert acl_of(Path(path)) == tuple(sorted(acl.reader_file(NOBODY_UID)))
    assert await trio.to_thread.run_sync(as_uid, NOBODY_UID, read_or_errno(path)) == [expect(BIG)]
    assert await trio.to_thread.run_sync(as_uid, THIRD_UID, read_or_errno(path)) == ["EACCES"]
    assert sorted(os.listdir(home)) == ["big.iso"]


async def test_a_download_dir_without_acls_fails_the_task_and_writes_nothing(
    start_shared: Any, http_server: HTTPTestServer, ramfs: Path
) -> None:
    downloads = ramfs / "downloads"
    url = http_server.route("/a.bin", serve_data(DATA))
    process, client = await start_shared(downloads, 0o077)
    task_id = (await download_as_nobody(process, urls=[url]))["result"]["task_id"]
    task = await finished(client, task_id)
    assert task["status"] == "failed", task
    assert task["error"] == (
        f"{downloads} is on a filesystem without POSIX ACLs, which downloads for other users "
        "need (so that only they can read their files); nothing was written"
    )
    assert os.listdir(downloads) == []
    assert http_server.requests_for("/a.bin") == []
    # The daemon's own user needs no ACL: root's download still works there.
    own = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
    assert (await finished(client, own))["status"] == "completed"
    assert os.listdir(downloads) == ["a.bin"]

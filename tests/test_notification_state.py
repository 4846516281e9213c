"""The notification index without async: who sees what, per-user read and deleted state,
counters, listing, the journal's replay and snapshot, and the field rules."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from statusd.errors import InvalidParams
from statusd.state.notifications import (
    MAX_LIMIT,
    JournalError,
    NotificationIndex,
    NotificationRecord,
    check_field,
    check_limit,
    create_record,
    cut,
    delete_read_record,
    delete_record,
    read_all_record,
    read_record,
)


def make(index: NotificationIndex, username: str | None, title: str = "t") -> int:
    notification_id = index.new_id()
    record: NotificationRecord = {
        "id": notification_id,
        "username": username,
        "type": "test",
        "title": title,
        "message": f"message {notification_id}",
        "link": None,
        "created_at": "2026-11-25T12:00:00.000Z",
    }
    index.add(record)
    return notification_id


def ids(index: NotificationIndex, user: str, **kw: Any) -> list[int]:
    return [n["id"] for n in index.newest_first(user, **kw)]


# -- who sees what ---------------------------------------------------------------------------


def test_inbox_is_own_plus_system_wide_newest_first() -> None:
    index = NotificationIndex()
    a1 = make(index, "alice")
    s1 = make(index, None)
    b1 = make(index, "bob")
    a2 = make(index, "alice")
    assert ids(index, "alice") == [a2, s1, a1]
    assert ids(index, "bob") == [b1, s1]
    assert ids(index, "carol") == [s1]
    assert index.visible("alice", b1) is None
    assert index.visible("bob", b1) is not None
    assert index.visible("alice", 999) is None
    listed = index.newest_first("alice")[0]
    assert listed == {
        "id": a2,
        "username": "alice",
        "type": "test",
        "title": "t",
        "message": f"message {a2}",
        "link": None,
        "created_at": "2026-11-25T12:00:00.000Z",
        "read": False,
    }


def test_others_cannot_read_or_delete_a_users_notification() -> None:
    index = NotificationIndex()
    a1 = make(index, "alice")
    assert not index.mark_read("bob", a1)
    assert not index.delete("bob", a1)
    assert index.unread_count("alice") == 1
    assert ids(index, "alice") == [a1]


def test_system_wide_read_state_is_per_user() -> None:
    index = NotificationIndex()
    s1 = make(index, None)
    assert [index.unread_count(u) for u in ("alice", "bob", "carol")] == [1, 1, 1]
    assert index.mark_read("alice", s1)
    assert not index.mark_read("alice", s1)  # already read: nothing changes
    assert index.is_read("alice", s1)
    assert not index.is_read("bob", s1)
    assert [index.unread_count(u) for u in ("alice", "bob", "carol")] == [0, 1, 1]
    assert index.newest_first("alice")[0]["read"] is True
    assert index.newest_first("bob")[0]["read"] is False


def test_system_wide_delete_hides_it_for_that_user_only() -> None:
    index = NotificationIndex()
    s1 = make(index, None)
    assert index.delete("alice", s1)
    assert not index.delete("alice", s1)
    assert ids(index, "alice") == []
    assert ids(index, "bob") == [s1]
    assert index.unread_count("alice") == 0
    assert index.unread_count("bob") == 1
    assert index.visible("alice", s1) is None
    assert not index.mark_read("alice", s1)


def test_own_delete_removes_it() -> None:
    index = NotificationIndex()
    a1 = make(index, "alice")
    index.mark_read("alice", a1)
    assert index.read_count("alice") == 1
    assert index.delete("alice", a1)
    assert len(index) == 0
    assert (index.unread_count("alice"), index.read_count("alice")) == (0, 0)


# -- counters and listing --------------------------------------------------------------------


def test_mark_all_read_counts_own_and_system_wide_and_later_ones_stay_unread() -> None:
    index = NotificationIndex()
    a1, s1, _b1, s2 = make(index, "alice"), make(index, None), make(index, "bob"), make(index, None)
    index.mark_read("alice", s1)
    assert index.mark_all_read("alice", index.newest) == 2  # a1 and s2; s1 was read
    assert index.unread_count("alice") == 0
    assert index.unread_count("bob") == 3
    a3 = make(index, "alice")
    s3 = make(index, None)
    assert index.unread_count("alice") == 2
    assert ids(index, "alice", unread_only=True) == [s3, a3]
    assert ids(index, "alice") == [s3, a3, s2, s1, a1]
    assert index.mark_all_read("alice", index.newest) == 2
    assert index.mark_all_read("alice", index.newest) == 0


def test_mark_all_read_up_to_an_id_leaves_newer_ones() -> None:
    index = NotificationIndex()
    a1, s1, a2 = make(index, "alice"), make(index, None), make(index, "alice")
    assert index.mark_all_read("alice", s1) == 2
    assert ids(index, "alice", unread_only=True) == [a2]
    assert index.is_read("alice", a1)


def test_delete_read_deletes_own_and_hides_system_wide() -> None:
    index = NotificationIndex()
    a1, s1, a2, s2 = (
        make(index, "alice"),
        make(index, None),
        make(index, "alice"),
        make(index, None),
    )
    index.mark_read("alice", a1)
    index.mark_read("alice", s2)
    assert index.read_count("alice") == 2
    assert index.delete_read("alice", index.newest) == 2
    assert ids(index, "alice") == [a2, s1]
    assert ids(index, "bob") == [s2, s1]
    assert index.read_count("alice") == 0
    assert index.unread_count("alice") == 2
    index.mark_all_read("alice", index.newest)
    assert index.delete_read("alice", index.newest) == 2
    assert ids(index, "alice") == []
    assert index.delete_read("alice", index.newest) == 0
    assert index.delete_read("nobody-yet", index.newest) == 0


def test_limit_and_unread_only() -> None:
    index = NotificationIndex()
    made = [make(index, "alice" if n % 3 else None) for n in range(30)]
    assert ids(index, "alice", limit=5) == made[::-1][:5]
    for notification_id in made[::2]:
        index.mark_read("alice", notification_id)
    assert ids(index, "alice", unread_only=True, limit=4) == made[1::2][::-1][:4]
    assert ids(index, "alice", unread_only=True, limit=MAX_LIMIT) == made[1::2][::-1]


def test_deleted_ids_are_pruned_and_never_reused() -> None:
    index = NotificationIndex()
    made = [make(index, "alice") for _ in range(100)]
    for notification_id in made[:90]:
        assert index.delete("alice", notification_id)
    assert ids(index, "alice", limit=MAX_LIMIT) == made[90:][::-1]
    assert index.new_id() == 101
    # The high-water mark survives a snapshot even when the newest ones are gone.
    for notification_id in made[90:]:
        index.delete("alice", notification_id)
    again = NotificationIndex()
    again.replay(index.snapshot())
    assert again.new_id() == 102


def test_keys_find_a_notification_until_it_is_deleted() -> None:
    index = NotificationIndex()
    record: NotificationRecord = {
        "id": index.new_id(),
        "username": "alice",
        "type": "task_completed",
        "title": "t",
        "message": "",
        "link": None,
        "created_at": "2026-11-25T12:00:00.000Z",
    }
    index.add(record, key="task:t1:completed")
    assert index.by_key("task:t1:completed") == record["id"]
    copy = NotificationIndex()
    copy.replay(index.snapshot())
    assert copy.by_key("task:t1:completed") == record["id"]
    index.delete("alice", record["id"])
    assert index.by_key("task:t1:completed") is None


def test_a_late_add_lands_in_order_and_under_the_watermark_is_read() -> None:
    index = NotificationIndex()
    first, second, third = index.new_id(), index.new_id(), index.new_id()
    for notification_id in (first, third):
        index.add(_record(notification_id, None))
    index.mark_all_read("alice", third)
    index.add(_record(second, None))  # its append finished last
    assert ids(index, "alice") == [third, second, first]
    assert index.unread_count("alice") == 0
    assert index.unread_count("bob") == 3
    copy = NotificationIndex()
    copy.replay(index.snapshot())
    assert ids(copy, "alice") == [third, second, first]
    assert copy.unread_count("alice") == 0


def _record(notification_id: int, username: str | None) -> NotificationRecord:
    return {
        "id": notification_id,
        "username": username,
        "type": "test",
        "title": "t",
        "message": "",
        "link": None,
        "created_at": "2026-11-25T12:00:00.000Z",
    }


# -- the journal -----------------------------------------------------------------------------


def test_journal_records_replay_to_the_same_state() -> None:
    index = NotificationIndex()
    journal: list[Any] = []

    def create(username: str | None) -> int:
        record = _record(index.new_id(), username)
        journal.append(create_record(record))
        index.add(record)
        return record["id"]

    a1, s1, _a2, b1 = create("alice"), create(None), create("alice"), create("bob")
    journal.append(read_record("alice", s1))
    index.mark_read("alice", s1)
    journal.append(delete_record("bob", s1))
    index.delete("bob", s1)
    journal.append(read_all_record("bob", index.newest))
    index.mark_all_read("bob", index.newest)
    journal.append(delete_read_record("bob", index.newest))
    index.delete_read("bob", index.newest)
    journal.append(read_record("alice", a1))
    index.mark_read("alice", a1)
    copy = NotificationIndex()
    copy.replay(journal)
    assert state(copy) == state(index)
    assert ids(copy, "bob") == []
    assert b1 not in ids(copy, "alice")


def test_unknown_or_malformed_records_are_refused_with_their_number() -> None:
    index = NotificationIndex()
    with pytest.raises(JournalError, match=r"record 2: unknown op 'explode'"):
        index.replay([create_record(_record(1, None)), {"op": "explode"}])
    with pytest.raises(JournalError, match=r"record 1: malformed 'read' record"):
        NotificationIndex().replay([{"op": "read", "id": 1}])
    with pytest.raises(JournalError, match=r"record 1: malformed create record \[None\]"):
        NotificationIndex().replay([[None]])
    with pytest.raises(JournalError, match=r"record 1: malformed create record \['1', None"):
        NotificationIndex().replay([["1", None, "t", "t", "m", None, "2026-11-25T12:00:00Z"]])
    with pytest.raises(JournalError, match=r"record 1: unknown op 'create'"):
        NotificationIndex().replay([{"op": "create", "notification": {"username": None}}])
    with pytest.raises(JournalError, match=r"record 1: a journal record is an array or an object"):
        NotificationIndex().replay(["create"])  # type: ignore[list-item]
    with pytest.raises(JournalError, match="notification 1 already exists"):
        NotificationIndex().replay([create_record(_record(1, None))] * 2)


# -- field rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("type", "", "type: must not be empty"),
        ("type", "x" * 51, "type: must be at most 50 characters, not 51"),
        ("type", "task done", "type: may contain only letters, digits, '_', '-' and '.'"),
        ("title", "", "title: must not be empty"),
        ("title", "x" * 256, "title: must be at most 255 characters, not 256"),
        ("title", "two\nlines", "title: must be one line without control characters"),
        ("message", "x" * 4001, "message: must be at most 4000 characters, not 4001"),
        ("link", "", "link: must not be empty"),
        ("link", "x" * 501, "link: must be at most 500 characters, not 501"),
        ("link", "/a b", "link: must not contain spaces or control characters"),
        ("username", "", "username: must not be empty"),
        ("username", "x" * 257, "username: must be at most 256 characters, not 257"),
        ("username", "a\x1bb", "username: must not contain control characters"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(field: str, value: str, problem: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        check_field(field, value)
    assert caught.value.message == problem
    assert caught.value.data["field"] == field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("type", "task_completed"),
        ("type", "x" * 50),
        ("title", "Ünïcode title ✓"),
        ("message", ""),
        ("message", "two\nlines\tand tabs"),
        ("link", "statusd://tasks/t1"),
        ("username", "alice"),
        ("username", None),
    ],
)
def test_good_fields_pass(field: str, value: str | None) -> None:
    check_field(field, value)


@pytest.mark.parametrize("limit", [0, -1, MAX_LIMIT + 1])
def test_limit_out_of_range(limit: int) -> None:
    with pytest.raises(InvalidParams, match=f"limit: must be between 1 and 1000, not {limit}"):
        check_limit(limit)


def test_cut() -> None:
    assert cut("abc", 3) == "abc"
    assert cut("abcdef", 5) == "ab..."


# -- the property: counters always equal a scan ----------------------------------------------

USERS = ("alice", "bob", "carol")
OWNERS = ("alice", "bob", None)


class Model:
    """The rules written the slow, obvious way: scan everything."""

    def __init__(self) -> None:
        self.owner: dict[int, str | None] = {}
        self.read: set[tuple[str, int]] = set()
        self.hidden: set[tuple[str, int]] = set()

    def inbox(self, user: str) -> list[int]:
        return sorted(
            (
                n
                for n, owner in self.owner.items()
                if owner == user or (owner is None and (user, n) not in self.hidden)
            ),
            reverse=True,
        )

    def unread(self, user: str) -> int:
        return sum((user, n) not in self.read for n in self.inbox(user))

    def apply(self, op: str, user: str, n: int) -> None:
        visible = self.inbox(user)
        if op == "read" and n in visible:
            self.read.add((user, n))
        elif op == "delete" and n in visible:
            self._remove(user, n)
        elif op == "read_all":
            self.read |= {(user, m) for m in visible if m <= n}
        elif op == "delete_read":
            for m in visible:
                if m <= n and (user, m) in self.read:
                    self._remove(user, m)

    def _remove(self, user: str, n: int) -> None:
        if self.owner[n] is None:
            self.hidden.add((user, n))
        else:
            del self.owner[n]


def state(index: NotificationIndex) -> dict[str, Any]:
    return {
        user: (
            index.unread_count(user),
            index.read_count(user),
            [(n["id"], n["read"]) for n in index.newest_first(user, limit=MAX_LIMIT)],
        )
        for user in USERS
    }


operation = st.one_of(
    st.tuples(st.just("create"), st.sampled_from(OWNERS), st.just(0)),
    st.tuples(
        st.sampled_from(["read", "delete", "read_all", "delete_read"]),
        st.sampled_from(USERS),
        st.integers(min_value=0, max_value=12),
    ),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(operation, max_size=60))
# A system-wide one hidden above the read watermark stays hidden when delete_read moves
# the hidden watermark up to the read one.
@example(
    [
        ("create", None, 0),
        ("create", None, 0),
        ("delete", "alice", 2),
        ("read_all", "alice", 1),
        ("delete_read", "alice", 5),
    ]
)
def test_counters_always_equal_a_scan(operations: list[tuple[str, Any, int]]) -> None:
    index = NotificationIndex()
    model = Model()
    journal: list[Any] = []
    for op, who, n in operations:
        if op == "create":
            record = _record(index.new_id(), who)
            journal.append(create_record(record))
            index.add(record)
            model.owner[record["id"]] = who
            continue
        if op == "read":
            journal.append(read_record(who, n))
            changed = index.mark_read(who, n)
            assert changed == (n in model.inbox(who) and (who, n) not in model.read)
        elif op == "delete":
            journal.append(delete_record(who, n))
            assert index.delete(who, n) == (n in model.inbox(who))
        elif op == "read_all":
            journal.append(read_all_record(who, n))
            expected = sum(m <= n and (who, m) not in model.read for m in model.inbox(who))
            assert index.mark_all_read(who, n) == expected
        else:
            journal.append(delete_read_record(who, n))
            expected = sum(m <= n and (who, m) in model.read for m in model.inbox(who))
            assert index.delete_read(who, n) == expected
        model.apply(op, who, n)
        for user in USERS:
            inbox = model.inbox(user)
            assert index.unread_count(user) == model.unread(user)
            assert index.read_count(user) == len(inbox) - model.unread(user)
            listed = index.newest_first(user, limit=MAX_LIMIT)
            assert [(m["id"], m["read"]) for m in listed] == [
                (m, (user, m) in model.read) for m in inbox
            ]
            unread = index.newest_first(user, unread_only=True, limit=3)
            assert [m["id"] for m in unread] == [m for m in inbox if (user, m) not in model.read][
                :3
            ]
    replayed, restored = NotificationIndex(), NotificationIndex()
    replayed.replay(journal)
    restored.replay(index.snapshot())
    assert state(replayed) == state(index)
    assert state(restored) == state(index)
    assert restored.new_id() == replayed.new_id() == index.new_id()

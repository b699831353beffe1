"""workers/member.py: a cluster-mode worker's id belongs to its data directory and slot."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.member import MAX_SLOTS, Member, MemberError

pytestmark = pytest.mark.unit


def test_a_restarted_worker_gets_its_id_back_and_a_concurrent_one_another(tmp_path: Path) -> None:
    first = Member(tmp_path)
    second = Member(tmp_path)  # another process on the same directory (--processes)
    assert first.id != second.id and (first.slot, second.slot) == (0, 1)
    kept = first.id
    first.close()  # the process died: the kernel drops its flock
    again = Member(tmp_path)
    assert again.id == kept and again.slot == 0
    again.close()
    second.close()


def test_a_new_directory_draws_new_ids(tmp_path: Path) -> None:
    a = Member(tmp_path / "a")
    b = Member(tmp_path / "b")
    assert a.id != b.id


def test_a_damaged_member_file_is_refused_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "members").mkdir()
    (tmp_path / "members" / "0").write_text("not an id")
    with pytest.raises(MemberError, match="members/0"):
        Member(tmp_path)


def test_slots_are_bounded(tmp_path: Path) -> None:
    held = [Member(tmp_path) for _ in range(MAX_SLOTS)]
    with pytest.raises(MemberError, match="slots"):
        Member(tmp_path)
    for member in held:
        member.close()


def test_a_directory_belongs_to_one_host(tmp_path: Path) -> None:
    first = Member(tmp_path, "h1")
    second = Member(tmp_path, "h1")  # another worker process of the same host: fine
    with pytest.raises(MemberError, match="belongs to host 'h1'"):
        Member(tmp_path, "h2")
    first.close()
    second.close()

"""Planning a launched agent's confinement (pure parts: which directories
are closed to a uid, which Landlock rules leave the kernel's out)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aiosd import confine


def test_closed_directories_on_the_way_are_found_outermost_first(tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    inner = outer / "inner"
    (inner / "lib").mkdir(parents=True)
    (inner / "prog.py").write_text("")
    (outer / "secret").mkdir()
    tmp_path.chmod(0o755)
    outer.chmod(0o700)
    inner.chmod(0o700)
    uid = 61184 if os.getuid() != 61184 else 61185
    reach = confine.reach_for([str(inner / "lib"), str(inner / "prog.py")], uid, uid)
    # (pytest's own directories above may be closed too: they come first)
    assert reach[-2:] == ((str(outer), ("inner",)), (str(inner), ("lib", "prog.py")))
    # what is open to the uid needs nothing
    inner.chmod(0o755)
    outer.chmod(0o755)
    assert all(not d.startswith(str(tmp_path))
               for d, _ in confine.reach_for([str(inner / "lib")], uid, uid))


def test_landlock_rules_leave_out_the_hidden_directories(tmp_path: Path) -> None:
    for name in ("a/data", "a/run", "a/lib", "b"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "a" / "file").write_text("")
    rules = dict(confine._beneath_except(str(tmp_path), [str(tmp_path / "a" / "data"),
                                                         str(tmp_path / "a" / "run")], 1))
    assert set(rules) == {str(tmp_path / "b"), str(tmp_path / "a" / "lib"),
                          str(tmp_path / "a" / "file")}
    assert confine._beneath_except(str(tmp_path / "a" / "data"),
                                   [str(tmp_path / "a" / "data")], 1) == []


def test_dynamic_users_are_not_shared_while_taken() -> None:
    users = confine.Users("dynamic")
    first, second = users.allot(), users.allot()
    assert first != second and first[0] in confine.DYNAMIC_UIDS
    users.release(first[0])
    assert first[0] not in users.taken and second[0] in users.taken


def test_a_named_agent_user_is_looked_up() -> None:
    assert confine.Users("65534").allot() == (65534, confine.Users("65534").fixed()[1])
    with pytest.raises(LookupError, match="no user"):
        confine.Users("no-such-user-here").allot()

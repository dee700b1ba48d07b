"""The kernels' build lock (kernels/build.py): a build killed midway leaves torch's `lock` marker behind, and
torch's builder would then wait for it forever on the next import; under our flock it is always a leftover."""
from __future__ import annotations

import fcntl

from optistack.kernels.build import build_lock


def test_a_killed_builds_marker_is_cleared_and_the_lock_is_exclusive(tmp_path):
    directory = tmp_path / "cpu-cpp-0123456789abcdef"
    directory.mkdir()
    (directory / "lock").write_text("")  # what a build killed midway leaves
    (directory / "bindings.o").write_text("partial")  # its outputs stay: ninja decides what to rebuild
    with build_lock(directory):
        assert not (directory / "lock").exists()
        assert (directory / "bindings.o").exists()
        with open(directory / ".optistack.lock") as other:  # another process's build waits here
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = False
            except BlockingIOError:
                held = True
        assert held
    with open(directory / ".optistack.lock") as other:  # released after
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)

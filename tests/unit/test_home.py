"""The session home's carry: only regular, non-executable files named by ``session_carry`` reach the next job
of a session, never a tree by a directory's name, a link, an executable or a special file. Real directories,
no Docker; needs root (the carry writes as the owner with setfsuid), as the executor does."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from executor.globs import matching_files
from executor.agent.claude_code.agent import CARRY as DEFAULT_CARRY
from executor.transaction.home import carry, prepare_committed

from .upper_tree import OWNER, require_root, write

PROJECT = ".claude/projects/-workspace"


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir() or p.is_symlink())


def test_only_transcripts_by_their_own_name_are_carried(tmp_path):
    require_root()
    upper, committed = tmp_path / "upper", tmp_path / "committed"
    write(upper / PROJECT / "abc.jsonl", '{"type": "user"}\n')
    # a directory named like a transcript, holding what would run code in the next job
    write(upper / PROJECT / "x.jsonl" / "settings.json", '{"hooks": {}}')
    write(upper / PROJECT / "x.jsonl" / "hooks" / "run.sh", "#!/bin/sh\ntouch /tmp/pwned\n", mode=0o755)
    write(upper / PROJECT / "x.jsonl" / "deeper.jsonl", "{}\n")  # carried by its own name, not the directory's
    write(upper / PROJECT / "exec.jsonl", "#!/bin/sh\n", mode=0o750)  # executable: never carried
    os.symlink("/etc/passwd", upper / PROJECT / "link.jsonl")
    os.mkfifo(upper / PROJECT / "fifo.jsonl")
    write(upper / ".bashrc", "touch /tmp/pwned\n")
    prepare_committed(committed, OWNER, OWNER)

    carried = carry(upper, committed, DEFAULT_CARRY, OWNER, OWNER)

    assert sorted(carried) == [f"{PROJECT}/abc.jsonl", f"{PROJECT}/x.jsonl/deeper.jsonl"]
    assert files_under(committed) == sorted(carried)
    kept = (committed / PROJECT / "abc.jsonl").stat()
    assert stat.S_ISREG(kept.st_mode) and kept.st_uid == OWNER and not kept.st_mode & 0o111


def test_a_pattern_that_names_a_tree_still_carries_its_files(tmp_path):
    """``dir/**`` says "everything below" itself: the own-name rule keeps that working (files only)."""
    require_root()
    upper, committed = tmp_path / "upper", tmp_path / "committed"
    write(upper / ".config" / "tool" / "a.toml", "a = 1\n")
    write(upper / ".config" / "tool" / "sub" / "b.toml", "b = 2\n")
    write(upper / ".config" / "tool" / "run", "#!/bin/sh\n", mode=0o700)
    prepare_committed(committed, OWNER, OWNER)
    carried = carry(upper, committed, [".config/tool/**"], OWNER, OWNER)
    assert sorted(carried) == [".config/tool/a.toml", ".config/tool/sub/b.toml"]


def test_matching_files_judges_the_path_itself():
    assert matching_files("p/x.jsonl", ["*.jsonl"]) == ["*.jsonl"]
    assert matching_files("p/x.jsonl/settings.json", ["*.jsonl"]) == []
    assert matching_files(".claude/projects/p/x.jsonl/y.jsonl", [".claude/projects/**/*.jsonl"]) == [
        ".claude/projects/**/*.jsonl"]  # its own name matches, wherever it lies
    assert matching_files(".claude/projects/p/x.jsonl/hooks/run.sh", [".claude/projects/**/*.jsonl"]) == []
    assert matching_files("tests/a/b.py", ["tests/**"]) == ["tests/**"]
    assert matching_files("a.jsonl", ["!*.jsonl", ""]) == []

"""The scrub of an attempt's home layer, attacked as the agent would: links to host files beside files
holding the credential, under the names a scrub might write."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from executor.redact import Redactor, scrub_tree
from tests.unit.upper_tree import require_root

SECRET = "sk-test-SECRET-0c4f7e11"
UID = GID = 1000


def host_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("host data\n")
    os.chmod(path, 0o600)
    return path


def test_the_scrub_rewrites_only_the_agents_files_and_never_writes_through_a_link(tmp_path):
    require_root()
    victim, other = host_file(tmp_path / "host" / "victim"), host_file(tmp_path / "host" / "other")
    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    (home / ".leak").write_text(f"key={SECRET}\n")
    (home / ".claude" / "real").write_text(f"{SECRET}\n")
    os.symlink(victim, home / ".leak.redact")
    os.symlink(other, home / ".claude" / "creds")
    os.symlink(other, home / "dir-link")
    for path in (home, home / ".claude", home / ".leak", home / ".claude" / "real"):
        os.chown(path, UID, GID)
    for link in (home / ".leak.redact", home / ".claude" / "creds", home / "dir-link"):
        os.lchown(link, UID, GID)

    rewritten = scrub_tree(home, Redactor({"TOKEN": SECRET}), UID, GID)

    assert sorted(rewritten) == [".leak", "real"]
    assert (home / ".leak").read_text() == "key=[REDACTED:TOKEN]\n"
    assert (home / ".claude" / "real").read_text() == "[REDACTED:TOKEN]\n"
    for path in (home / ".leak", home / ".claude" / "real"):  # written with the owner's rights, not root's
        assert (path.stat().st_uid, path.stat().st_gid) == (UID, GID)
    for target in (victim, other):
        st = target.stat()
        assert target.read_text() == "host data\n" and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    assert os.readlink(home / ".leak.redact") == str(victim)  # the links are left as they were
    assert sorted(p.name for p in home.iterdir()) == [".claude", ".leak", ".leak.redact", "dir-link"]

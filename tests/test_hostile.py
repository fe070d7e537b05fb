"""Every hostile or unusual input through a real daemon ends in exactly one place (see
tests/hostile_cases.py, which also prints the README's table)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.daemon_helpers import files_under, tiny_checkpoint
from tests.hostile_cases import CASES, FAILED, IGNORED, MARKER, OUTBOX, run

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="inotify and the claim scheme are tested on Linux")


def test_every_hostile_input_ends_in_exactly_one_place(tmp_path: Path) -> None:
    ended, log = run(tmp_path, tiny_checkpoint(tmp_path / "tiny.safetensors"))
    assert len(CASES) >= 35
    wrong = [(e.case.path[:40], e.case.expect, e.where, e.detail) for e in ended if e.where != e.case.expect]
    assert not wrong, wrong
    # inputs = outputs + failed + ignored, and nothing else anywhere
    outputs = {o for e in ended if e.where == OUTBOX for o in (e.case.outputs or (e.case.path,))}
    assert set(files_under(tmp_path / "outbox")) == outputs
    failed = [f for f in files_under(tmp_path / "failed") if not f.endswith(".error.json")]
    assert sorted(failed) == sorted(e.case.path for e in ended if e.where == FAILED)
    assert len(files_under(tmp_path / "failed")) == 2 * len(failed)  # each with its reason
    done = files_under(tmp_path / "done")
    assert len(done) + len(failed) + sum(e.where == IGNORED for e in ended) == len(CASES)
    left = sorted(p.relative_to(tmp_path / "inbox").as_posix() for p in (tmp_path / "inbox").rglob("*")
                  if not p.is_dir() or p.is_symlink())
    assert left == sorted(e.case.path for e in ended if e.where == IGNORED)  # and no claim left in the work folder
    # both inputs that map to photo.png got an output, and the log says which took the suffix
    assert {"photo.png", "photo-1.png"} <= set(files_under(tmp_path / "outbox"))
    assert "was taken (output.on_conflict: suffix)" in log
    # no other decoder saw the disguised files, and nothing ran
    reasons = {e.case.path: e.detail for e in ended}
    for name in ("icon.png", "targa.png", "netpbm.jpg", "post.png", "doc.jpg"):
        assert "not one of the formats upscaled reads" in reasons[name], (name, reasons[name])
    assert not Path(MARKER).exists()
    assert "truncated" in reasons["cut.png"] and "empty" in reasons["empty.png"]

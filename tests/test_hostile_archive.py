"""Hostile numbers in member headers: one rule for restore, dry run and ``verify --deep``.

An archive from the bucket can say anything in its PAX records or in base-256 ustar fields:
an mtime of ``1e300``, ``nan`` or ``-inf``, a negative or 40-bit owner, a negative size. The
reader judges every member's numbers in one place (``stream.tarformat.member_problem``):

* restoring (and a dry run) refuses such a member, says why, and restores everything else
  (exit 1 at the CLI);
* walking the archive for ``verify --deep`` reports it damaged (IntegrityError, exit 3);
* a size past the end of any archive is a truncated archive for both (exit 3).

Nothing here may ever raise anything but IntegrityError.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from cloudbackup.core.errors import IntegrityError
from cloudbackup.stream.extract import extract
from cloudbackup.stream.pipeline import walk_archive
from cloudbackup.stream.tarformat import TarReader, member_problem

MTIME = 1_700_000_000
KINDS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}

# (PAX record, value, words the refusal must contain)
HOSTILE_PAX = [
    ("mtime", "1e300", "mtime"),
    ("mtime", "nan", "mtime"),
    ("mtime", "-inf", "mtime"),
    ("mtime", "inf", "mtime"),
    ("mtime", "1" + "0" * 25, "mtime"),  # digits, but past any time_t
    ("mtime", "12abc", "mtime"),  # tarfile alone would make it 0, silently
    ("uid", "-5", "uid"),
    ("uid", str(2**40), "uid"),
    ("uid", str(2**32 - 1), "uid"),  # (uid_t)-1: "leave the owner unchanged" to chown
    ("gid", "1e20", "gid"),  # tarfile alone would make it 0, silently
    ("gid", "-1", "gid"),
    ("size", "-1000", "size"),
    ("size", "-1", "size"),
]


def hostile_tar(kind: str, pax: dict[str, str], *, after: bool = True) -> bytes:
    """A PAX tar: ``victim`` (a ``kind`` member with the ``pax`` records), then ``after.txt``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("victim")
        info.type = KINDS[kind]
        info.mtime = MTIME
        info.mode = 0o755 if kind == "dir" else 0o644
        info.pax_headers = dict(pax)
        if kind == "symlink":
            info.linkname = "after.txt"
        tar.addfile(info)  # no data: a file member of size 0 (or what ``pax`` says)
        if after:
            good = tarfile.TarInfo("after.txt")
            good.mtime = MTIME
            good.size = 4
            tar.addfile(good, io.BytesIO(b"good"))
    return buf.getvalue()


def base256_tar(field: str, value: int) -> bytes:
    """A GNU-format member whose ``field`` is a base-256 number (negative or huge)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("victim")
        info.mtime = MTIME
        setattr(info, field, value)
        tar.addfile(info)
        good = tarfile.TarInfo("after.txt")
        good.mtime = MTIME
        good.size = 4
        tar.addfile(good, io.BytesIO(b"good"))
    return buf.getvalue()


def refusals_of(result: Any) -> list[str]:
    return [line for line in result.refused if "'victim'" in line]


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize(("key", "value", "words"), HOSTILE_PAX)
def test_a_hostile_pax_number_refuses_the_member_and_restores_the_rest(
    tmp_path: Path, kind: str, key: str, value: str, words: str
) -> None:
    raw = hostile_tar(kind, {key: value})
    result = extract(io.BytesIO(raw), tmp_path)
    assert len(refusals_of(result)) == 1, result.refused
    assert words in refusals_of(result)[0]
    assert (tmp_path / "after.txt").read_bytes() == b"good"
    assert not os.path.lexists(tmp_path / "victim")
    # A dry run (restore --dry-run --include) judges it the same way.
    dry = extract(io.BytesIO(raw), tmp_path / "nowhere", dry_run=True)
    assert refusals_of(dry) and words in refusals_of(dry)[0]
    assert dry.files == 1


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize(("key", "value", "words"), HOSTILE_PAX)
def test_verify_deep_reports_an_archive_with_a_hostile_number_as_damaged(
    kind: str, key: str, value: str, words: str
) -> None:
    with pytest.raises(IntegrityError) as caught:
        walk_archive(io.BytesIO(hostile_tar(kind, {key: value})))
    assert "victim" in str(caught.value) and words in str(caught.value)


@pytest.mark.parametrize(("field", "value"), [("uid", -5), ("gid", 2**40), ("mtime", -(2**70))])
def test_hostile_base256_numbers_follow_the_same_rule(
    tmp_path: Path, field: str, value: int
) -> None:
    raw = base256_tar(field, value)
    result = extract(io.BytesIO(raw), tmp_path)
    assert len(refusals_of(result)) == 1 and field in refusals_of(result)[0]
    assert (tmp_path / "after.txt").read_bytes() == b"good"
    with pytest.raises(IntegrityError):
        walk_archive(io.BytesIO(raw))


@pytest.mark.parametrize("size", [str(2**63), str(2**70), str(10**40)])
def test_a_size_past_the_end_of_any_archive_is_a_truncated_archive(
    tmp_path: Path, size: str
) -> None:
    raw = hostile_tar("file", {"size": size})
    with pytest.raises(IntegrityError):
        extract(io.BytesIO(raw), tmp_path)
    with pytest.raises(IntegrityError):
        extract(io.BytesIO(raw), tmp_path / "dry", dry_run=True)
    with pytest.raises(IntegrityError):
        walk_archive(io.BytesIO(raw))


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_hostile_member_left_out_by_include_is_skipped_without_seeking_by_its_size(
    tmp_path: Path, dry_run: bool
) -> None:
    raw = hostile_tar("file", {"size": "-1000"})
    result = extract(io.BytesIO(raw), tmp_path, include=["after.txt"], dry_run=dry_run)
    assert result.refused == [] and result.skipped_not_included == 1
    assert result.files == 1 and result.bytes == 4
    assert dry_run or (tmp_path / "after.txt").read_bytes() == b"good"
    included = extract(io.BytesIO(raw), tmp_path / "dry", include=["vic*"], dry_run=True)
    assert len(refusals_of(included)) == 1


def test_every_hostile_member_in_a_row_is_refused_and_the_rest_restored(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for n in range(300):  # more than any recursion would survive on a small stack
            info = tarfile.TarInfo(f"bad{n}")
            info.pax_headers = {"mtime": "nan"}
            tar.addfile(info)
        good = tarfile.TarInfo("after.txt")
        good.size = 4
        tar.addfile(good, io.BytesIO(b"good"))
    result = extract(io.BytesIO(buf.getvalue()), tmp_path)
    assert len(result.refused) == 300
    assert os.listdir(tmp_path) == ["after.txt"]


def test_good_numbers_are_no_problem() -> None:
    edge = {"mtime": "-1.5", "uid": str(2**32 - 2), "gid": "0"}
    with TarReader(io.BytesIO(hostile_tar("file", edge))) as tar:
        members = list(tar)
    assert [m.name for m in members] == ["victim", "after.txt"]
    assert all(member_problem(m) is None for m in members)
    assert members[0].uid == 2**32 - 2

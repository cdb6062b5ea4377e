"""One outcome per result, one map to exit codes (SPEC "Exit codes"), one to words."""

from __future__ import annotations

import itertools

import pytest

from cloudbackup.core.errors import (
    CloudBackupError,
    ConfigError,
    IntegrityError,
    LockHeld,
    PermanentStorageError,
    ShrinkGuardError,
    UsageError,
)
from cloudbackup.core.outcome import Outcome, exit_code, words, worst
from cloudbackup.ops.backup import SourceResult
from cloudbackup.ops.deletion import PruneResult
from cloudbackup.ops.run import RunReport
from cloudbackup.ops.upload import UploadResult
from cloudbackup.ops.verify import VerifyResult


def test_each_outcome_has_its_exit_code() -> None:
    assert {o: exit_code(o) for o in Outcome} == {
        Outcome.OK: 0,
        Outcome.WARNING: 1,
        Outcome.FAILED: 1,
        Outcome.INTEGRITY: 3,
        Outcome.REFUSED: 2,
        Outcome.LOCKED: 4,
        Outcome.INTERRUPTED: 130,
        Outcome.TERMINATED: 143,
    }


@pytest.mark.parametrize(
    ("outcomes", "code"),
    [
        ([], 0),
        ([Outcome.OK, Outcome.OK], 0),
        ([Outcome.OK, Outcome.WARNING], 1),
        ([Outcome.FAILED, Outcome.WARNING, Outcome.OK], 1),
        ([Outcome.FAILED, Outcome.INTEGRITY, Outcome.OK], 3),  # 3 > 1 > 0
        ([Outcome.REFUSED, Outcome.FAILED], 2),
        ([Outcome.LOCKED, Outcome.REFUSED, Outcome.FAILED], 4),
        ([Outcome.LOCKED, Outcome.INTEGRITY], 3),
        ([Outcome.INTEGRITY, Outcome.INTERRUPTED], 130),
        ([Outcome.INTERRUPTED, Outcome.TERMINATED, Outcome.INTEGRITY], 143),
    ],
)
def test_the_most_severe_outcome_gives_the_exit_code(outcomes: list[Outcome], code: int) -> None:
    assert exit_code(outcomes) == code
    for order in itertools.permutations(outcomes):
        assert exit_code(order) == code


def test_worst_prefers_a_failure_to_a_warning() -> None:
    assert worst([Outcome.WARNING, Outcome.FAILED]) is Outcome.FAILED
    assert worst([]) is Outcome.OK


def test_words_are_the_three_the_spec_uses() -> None:
    assert {o: words(o) for o in Outcome} == {
        Outcome.OK: "ok",
        Outcome.WARNING: "warning",
        Outcome.FAILED: "failed",
        Outcome.INTEGRITY: "failed",
        Outcome.REFUSED: "failed",
        Outcome.LOCKED: "failed",
        Outcome.INTERRUPTED: "failed",
        Outcome.TERMINATED: "failed",
    }


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (CloudBackupError("x"), 1),
        (PermanentStorageError("x"), 1),
        (ShrinkGuardError("x"), 1),
        (ConfigError("x"), 2),
        (UsageError("x"), 2),
        (IntegrityError("x"), 3),
        (LockHeld("x"), 4),
    ],
)
def test_errors_carry_an_outcome_and_derive_their_exit_code(
    error: CloudBackupError, code: int
) -> None:
    assert error.exit_code == exit_code(error.outcome) == code


def test_a_verify_result_is_judged_by_its_outcome_not_its_words() -> None:
    """The exit code of a verify once depended on whether its detail began with "cannot"."""
    differs = VerifyResult("www-20261121T021500Z", "remote", "cannot be trusted: sha256 differs")
    assert (differs.ok, exit_code(differs.outcome)) == (False, 3)
    unreadable = VerifyResult("www-20261121T021500Z", "local", "manifest unreadable")
    unreadable.outcome = Outcome.FAILED
    assert (unreadable.ok, exit_code(unreadable.outcome)) == (False, 1)


def test_a_run_report_derives_its_exit_code_from_every_part() -> None:
    report = RunReport(results=[SourceResult("www", archived=True)])
    assert report.exit_code == 0
    report.results.append(SourceResult("db", archived=True, outcome=Outcome.WARNING))
    assert report.exit_code == 1
    report.uploads.append(UploadResult("www-20261121T021500Z", "www", outcome=Outcome.OK))
    report.prunes.append(PruneResult("local", "h", "www", "last=3", errors=["cannot delete"]))
    assert (report.outcome, report.exit_code) == (Outcome.FAILED, 1)
    report.verifies.append(VerifyResult("www-20261121T021500Z", "remote", "size differs"))
    assert report.exit_code == 3
    assert RunReport(errors=["the bucket cannot be listed"]).exit_code == 1
    report.interrupted = Outcome.TERMINATED
    assert (report.exit_code, words(report.outcome)) == (143, "failed")


def test_forget_fails_on_a_retained_backup_prune_does_not() -> None:
    retained = [("www-20261121T021500Z", "retained by object lock until 2027-01-01T00:00:00Z")]
    pruned = PruneResult("remote", "h", "www", "last=1", retained=list(retained))
    forgotten = PruneResult("remote", "h", "www", "forget", retained=list(retained), named=True)
    assert (pruned.outcome, forgotten.outcome) == (Outcome.OK, Outcome.FAILED)

"""The operator's nightly job through the real command line, against moto: a quiet good
night prints nothing at all, a failed one prints its summary and errors and sends one
e-mail (a local SMTP server) with the log tail and no secret; notifications and hooks around
`run`; an interrupted run (SIGTERM, SIGINT) recorded, pinged and notified; each event once
on a terminal; the log formats (journald, plain, JSON)."""

from __future__ import annotations

import email
import email.policy
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Clock, Env, RemoteEnv, S3Env, make_tree
from tests.integration import test_notify_delivery as delivery
from tests.integration.test_notify_delivery import _SMTPHandler
from tests.test_monitor import PingServer, closed_port_url

pytestmark = pytest.mark.slow

DB_PASSWORD = "Sh0p-S3cr3t-PW"
AWS_SECRET = "aws-Secret-Key-9f8e7d"
SHOP_URL = f"postgresql://app:{DB_PASSWORD}@127.0.0.1:1/shop"  # nothing listens on port 1
SHOP = f"shop={SHOP_URL}"


#: The local SMTP server of the delivery tests: its `mailto://` URL and the mails it got.
smtp_server = delivery.smtp


@pytest.fixture
def receiver() -> Iterator[PingServer]:
    """An HTTP server recording every request: a healthchecks URL and a `json://` webhook."""
    with PingServer() as server:
        yield server


@pytest.fixture
def www(env: Env) -> Path:
    return make_tree(env.tmp / "srv" / "www", {"index.html": "<h1>hi</h1>\n", "a/b.txt": "b\n"})


@pytest.fixture
def host(env: Env, www: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    """A configured host: one directory source and a distinctive AWS key (set after the
    destination's fixture, which sets fake credentials)."""
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", str(www))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    return env


@pytest.fixture
def night(s3_env: S3Env, host: Env) -> Env:
    """A configured host with a bucket on moto."""
    return host


@pytest.fixture
def any_night(remote: RemoteEnv, host: Env) -> tuple[Env, RemoteEnv]:
    """A configured host, once with a bucket on moto and once with a directory destination."""
    return host, remote


def cloudbackup(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    """The real command line in its own process (the environment is the test's)."""
    return subprocess.run(
        [sys.executable, "-m", "cloudbackup", *args], capture_output=True, timeout=120, **kwargs
    )


def webhook_posts(server: PingServer) -> list[dict[str, Any]]:
    return [json.loads(p.body) for p in server.pings if p.path.startswith("/hook")]


# ---------------------------------------------------------------- quiet nights (1)


def test_quiet_good_night_prints_nothing_at_all(
    any_night: tuple[Env, RemoteEnv], receiver: PingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, remote = any_night
    hook_url = receiver.url.replace("/ping/0f6c2b9e", "/hook").replace("http://", "json://")
    monkeypatch.setenv("CLOUDBACKUP_NOTIFY", hook_url)  # on failure only: not tonight
    monkeypatch.setenv("CLOUDBACKUP_PING_URL", receiver.url)
    monkeypatch.setenv("CLOUDBACKUP_AFTER_RUN", "echo after-run said this")
    for _night in range(2):  # the second night uploads, verifies and prunes as well
        done = cloudbackup("-q", "run")
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    assert [p.path.split("/")[-1] for p in receiver.pings] == ["start", "0f6c2b9e"] * 2
    assert webhook_posts(receiver) == []
    assert len([k for k in remote.keys() if k.endswith(".manifest.json")]) == 2


def test_quiet_failed_night_prints_its_summary_and_errors_and_mails_them(
    any_night: tuple[Env, RemoteEnv],
    www: Path,
    smtp_server: tuple[str, _SMTPHandler],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, server = smtp_server
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", f"{www}\n{SHOP}")
    monkeypatch.setenv("CLOUDBACKUP_NOTIFY", url)
    # Its output is logged, so the log tail holds the password, but redacted.
    monkeypatch.setenv("CLOUDBACKUP_ON_FAILURE", f"echo could not dump {SHOP_URL}")
    failed = cloudbackup("-q", "run")
    assert failed.returncode == 1
    out, err = failed.stdout.decode(), failed.stderr.decode()
    # The summary: www backed up, shop failed, the verdict.
    assert re.search(r"^www\s+www-\S+\s+ok\s", out, re.M), out
    assert re.search(r"^shop\s+-\s+FAILED\s", out, re.M), out
    assert "1 of 2 source(s) backed up; failed: shop" in out
    assert "run completed with failures" in out and "(exit 1)" in out
    # The errors (on stderr, held back until the outcome was known), and nothing else there.
    lines = err.splitlines()
    assert lines and all(" error: " in line for line in lines), err
    assert any("shop" in line for line in lines)
    # One e-mail, with the summary and the log tail, and no secret anywhere in it.
    assert len(server.mails) == 1
    mail = server.mails[0]
    parsed = email.message_from_bytes(mail.raw, policy=email.policy.default)
    assert parsed["Subject"] == "cloudbackup testhost: failed (exit 1)"
    body = parsed.get_body(("plain",))
    assert body is not None
    text = body.get_content().replace("\r\n", "\n")
    assert "1 of 2 source(s) backed up; failed: shop" in text
    tail = text.split("Last ", 1)[1]
    assert re.match(r"\d+ log lines:\n", tail), tail
    assert "www: archived 2 files" in tail, tail
    assert "source shop: cannot connect to PostgreSQL at 127.0.0.1:1" in tail, tail
    assert "hook on-failure: could not dump postgresql://app:***@127.0.0.1:1/shop" in tail, tail
    for secret in (DB_PASSWORD, AWS_SECRET):
        assert secret not in text and secret.encode() not in mail.raw
        assert secret not in out and secret not in err


def test_a_notification_that_cannot_be_sent_is_a_warning_never_a_failure(
    night: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = closed_port_url().replace("http://", "json://hook:tok3n-xyz@")
    monkeypatch.setenv("CLOUDBACKUP_NOTIFY", refused)
    monkeypatch.setenv("CLOUDBACKUP_NOTIFY_ON", "always")
    loud = cloudbackup("run")
    assert loud.returncode == 0, loud.stderr
    warning = [line for line in loud.stderr.decode().splitlines() if "notification" in line]
    assert len(warning) == 1 and "warning: notification entry 1, json://*** not sent" in warning[0]
    assert "tok3n" not in loud.stderr.decode()
    quiet = cloudbackup("-q", "run")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, b"", b"")


def test_a_url_apprise_cannot_use_is_exit_2_before_anything_is_done(
    night: Env, receiver: PingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_NOTIFY", "json://ok.example.org/hook, nosuchscheme://tok3n@x")
    monkeypatch.setenv("CLOUDBACKUP_PING_URL", receiver.url)
    result = cloudbackup("run")
    assert result.returncode == 2
    err = result.stderr.decode()
    assert "CLOUDBACKUP_NOTIFY: entry 2, nosuchscheme://***" in err and "tok3n" not in err
    assert not night.local_dir.exists()  # nothing was done
    assert receiver.calls == [("POST", "/fail")]  # the ping still hears of it


def test_apprise_is_imported_only_when_notifying(night: Env) -> None:
    probe = (
        "import sys\n"
        "from cloudbackup.cli import main\n"
        "try:\n    main(['-q', 'run'])\n"
        "except SystemExit as exc:\n    code = exc.code\n"
        "print(code, 'apprise' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120)
    assert done.stdout.decode().split() == ["0", "False"], done.stderr


# ---------------------------------------------------------------- notifications and hooks


def test_notify_on_always_sends_the_good_night_as_success(
    night: Env, receiver: PingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook_url = receiver.url.replace("/ping/0f6c2b9e", "/hook").replace("http://", "json://")
    monkeypatch.setenv("CLOUDBACKUP_NOTIFY", hook_url)
    monkeypatch.setenv("CLOUDBACKUP_NOTIFY_ON", "always")
    assert cloudbackup("-q", "run").returncode == 0
    (posted,) = webhook_posts(receiver)
    assert posted["title"] == "cloudbackup testhost: ok (exit 0)" and posted["type"] == "success"
    assert "run succeeded" in posted["message"]


def test_a_failing_before_hook_stops_the_run_and_the_after_hooks_get_the_result(
    night: Env, receiver: PingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = night.tmp / "hooks.txt"
    monkeypatch.setenv("CLOUDBACKUP_PING_URL", receiver.url)
    monkeypatch.setenv("CLOUDBACKUP_BEFORE_RUN", f"echo before >> {record}; exit 3")
    after = (
        f'echo "after $CLOUDBACKUP_RESULT $CLOUDBACKUP_EXIT_CODE ${{CLOUDBACKUP_S3_BUCKET:-scrubbed}}"'
        f' >> {record}; cp "$CLOUDBACKUP_SUMMARY" {night.tmp}/summary.json'
    )
    monkeypatch.setenv("CLOUDBACKUP_AFTER_RUN", after)
    monkeypatch.setenv("CLOUDBACKUP_ON_FAILURE", f"echo on-failure >> {record}")
    result = cloudbackup("run")
    assert result.returncode == 1
    assert record.read_text().splitlines() == ["before", "after failed 1 scrubbed", "on-failure"]
    summary = json.loads((night.tmp / "summary.json").read_text())
    assert summary["exit_code"] == 1 and summary["results"] == []
    assert "hook before-run failed: exit code 3; nothing was backed up" in summary["errors"]
    assert night.archives("www") == []  # nothing was backed up
    assert [p.path.split("/")[-1] for p in receiver.pings] == ["start", "fail"]
    assert "hook before-run failed" in result.stdout.decode()


def test_a_failing_after_hook_is_a_warning_and_keeps_the_exit_code(
    night: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_AFTER_RUN", "echo restarting; exit 7")
    result = cloudbackup("run")
    assert result.returncode == 0
    out = result.stdout.decode()
    assert "warning: hook after-run failed: exit code 7" in out and "run succeeded" in out
    assert "hook after-run: restarting" in result.stderr.decode()
    assert len(night.archives("www")) == 1


def test_run_dry_run_plans_and_tells_nobody(
    night: Env, receiver: PingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = night.tmp / "hook-ran"
    hook_url = receiver.url.replace("/ping/0f6c2b9e", "/hook").replace("http://", "json://")
    monkeypatch.setenv("CLOUDBACKUP_PING_URL", receiver.url)
    monkeypatch.setenv("CLOUDBACKUP_NOTIFY", hook_url)
    monkeypatch.setenv("CLOUDBACKUP_NOTIFY_ON", "always")
    monkeypatch.setenv("CLOUDBACKUP_BEFORE_RUN", f"touch {marker}")
    monkeypatch.setenv("CLOUDBACKUP_AFTER_RUN", f"touch {marker}")
    assert cloudbackup("-q", "run", "--source", "www").returncode == 0  # one earlier night
    receiver.pings.clear()
    marker.unlink()
    before = sorted(p for p in night.local_dir.rglob("*") if p.is_file())
    result = cloudbackup("run", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["dry_run"] is True
    (planned,) = document["results"]
    assert planned["result"] == "would back up" and planned["plan"]["files"] == 2
    assert planned["plan"]["remote_key"].startswith("cloudbackup/testhost/www/www-")
    assert document["would_upload"] == []
    assert [r["where"] for r in document["prune"]] == ["local"]
    human = cloudbackup("run", "--dry-run")
    assert "no hooks, pings or notifications" in human.stdout.decode()
    assert sorted(p for p in night.local_dir.rglob("*") if p.is_file()) == before
    assert receiver.pings == [] and not marker.exists()


# ---------------------------------------------------------------- interrupted (4)


def _start_slow_run(
    env: Env, www: Path, monkeypatch: pytest.MonkeyPatch, command: str = "run", **popen: Any
) -> Any:
    started = env.tmp / "slow-started"
    slow = f"slow=cmd:/bin/sh -c 'touch {started}; sleep 60'"
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", f"{www}\n{slow}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudbackup", command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert started.exists(), proc.communicate(timeout=30)
    return proc


@pytest.mark.parametrize(
    ("signum", "code", "name"),
    [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")],
)
def test_an_interrupted_run_is_recorded_pinged_and_notified(
    night: Env,
    www: Path,
    receiver: PingServer,
    monkeypatch: pytest.MonkeyPatch,
    signum: int,
    code: int,
    name: str,
) -> None:
    hook_url = receiver.url.replace("/ping/0f6c2b9e", "/hook").replace("http://", "json://")
    monkeypatch.setenv("CLOUDBACKUP_PING_URL", receiver.url)
    monkeypatch.setenv("CLOUDBACKUP_NOTIFY", hook_url)
    monkeypatch.setenv("CLOUDBACKUP_AFTER_RUN", f"echo $CLOUDBACKUP_RESULT > {night.tmp}/after")
    # A terminal's Ctrl-C: SIGINT must not be ignored in the child (as in a background job).
    restore_sigint = {"preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)}
    proc = _start_slow_run(night, www, monkeypatch, **restore_sigint)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    summary = out.decode()
    assert f"interrupted by {name}" in summary and "run interrupted" in summary
    # The summary, the notification and the record say what finished and what did not.
    assert re.search(r"^www\s+www-\S+\s+ok\s", summary, re.M), summary
    assert re.search(r"^slow\s+-\s+FAILED\s.*not backed up: interrupted", summary, re.M), summary
    assert "1 of 2 source(s) backed up; failed: slow" in summary
    assert "Traceback" not in err.decode()
    assert (night.tmp / "after").read_text().strip() == "failed"
    assert [p.path.split("/")[-1] for p in receiver.pings if "/ping/" in p.path] == ["start", "fail"]
    (posted,) = webhook_posts(receiver)
    assert posted["title"] == f"cloudbackup testhost: failed (exit {code})"
    assert posted["type"] == "failure"
    assert "1 of 2 source(s) backed up; failed: slow" in posted["message"]
    # What finished before the signal is kept; `status` says the run was interrupted.
    assert len(night.archives("www")) == 1 and night.archives("slow") == []
    state = json.loads((night.local_dir / ".state" / "testhost.last-run.json").read_text())
    assert state["interrupted"] == name and state["exit_code"] == code
    assert [(r["source"], r["ok"]) for r in state["results"]] == [("www", True), ("slow", False)]
    status = cloudbackup("status", "--json")
    assert status.returncode == 2  # `slow` has no backup at all: CRITICAL
    document = json.loads(status.stdout)
    rows = {s["source"]: s for s in document["hosts"][0]["sources"]}
    assert rows["www"]["state"] == "WARNING"  # backed up, but by a run that was interrupted
    assert rows["www"]["reasons"] == [f"interrupted: the last run was stopped by {name}"]
    human = cloudbackup("status").stdout.decode()
    assert f"interrupted: the last run was stopped by {name}" in human


def test_an_interrupted_backup_says_what_finished(
    any_night: tuple[Env, RemoteEnv], www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, _ = any_night
    proc = _start_slow_run(env, www, monkeypatch, "backup")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    summary = out.decode()
    assert re.search(r"^www\s+www-\S+\s+ok\s.*yes", summary, re.M), summary
    assert re.search(r"^slow\s+-\s+FAILED\s.*not backed up: interrupted", summary, re.M), summary
    assert summary.rstrip().endswith("backup interrupted by SIGTERM (exit 143)"), summary
    assert "Traceback" not in err.decode()
    assert len(env.archives("www")) == 1 and env.archives("slow") == []


# ---------------------------------------------------------------- one event, once (8)


def _on_a_terminal(*args: str) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on one pseudo-terminal; what the operator sees."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudbackup", *args],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env=os.environ | {"COLUMNS": "300"},
    )
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    return proc.wait(timeout=60), seen.decode(errors="replace").replace("\r\n", "\n")


def test_each_event_is_shown_once_on_a_terminal(
    night: Env, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = night.tmp / "srv" / "gone"
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", f"{www}\n{gone}")
    (www / "big.bin").write_bytes(os.urandom(12 << 20))  # parts sent while it is archived
    code, seen = _on_a_terminal("run")
    assert code == 1
    assert seen.count(f"{gone}") == 1, seen  # the failure: in the summary only
    assert "1 of 2 source(s) backed up; failed: gone" in seen
    # The progress bar was on that terminal too, and ended with its final count.
    assert "archive www: 3 of 3 files" in seen, repr(seen)
    # The upload's bar: the parts sent while the archive was written, then the rest.
    assert re.search(r"upload www-\S+: [1-9][0-9.]* MiB", seen), repr(seen)
    # Not on a terminal, the log keeps its line and the summary comes on top (cron mail).
    piped = cloudbackup("run")
    assert piped.stderr.decode().count(f"{gone}") == 1
    assert piped.stdout.decode().count(f"{gone}") == 1


# ---------------------------------------------------------------- log formats


def test_under_systemd_lines_carry_journald_priorities_and_no_timestamp(
    night: Env, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", f"{www}\n{night.tmp / 'missing'}")
    log = night.tmp / "journal-stream"
    with open(log, "wb") as stream:
        st = os.fstat(stream.fileno())
        environ = os.environ | {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "INVOCATION_ID": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "cloudbackup", "run"], stdout=subprocess.PIPE, stderr=stream,
            env=environ, timeout=120,
        )  # fmt: skip
    assert done.returncode == 1
    lines = log.read_text().splitlines()
    assert any(re.fullmatch(r"<3>error: source missing: .*", line) for line in lines), lines
    assert any(line.startswith("<6>www: archived 2 files") for line in lines), lines
    assert not any(re.search(r"\d{4}-\d\d-\d\dT\d\d:", line) for line in lines)
    # Another service manager's capture (no journal): no timestamps, no priorities.
    bare = cloudbackup("run", env=os.environ | {"INVOCATION_ID": "1"}).stderr.decode()
    assert re.search(r"^error: source missing: ", bare, re.M) and "<3>" not in bare
    # Cron, a pipe: a timestamp first.
    plain = cloudbackup("run").stderr.decode()
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} error: source missing: ", plain, re.M)


def test_log_json_is_one_redacted_object_per_line(
    night: Env, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", f"{www}\n{SHOP}")
    log_file = night.tmp / "log" / "cloudbackup.log"
    monkeypatch.setenv("CLOUDBACKUP_LOG_FILE", str(log_file))
    monkeypatch.setenv("CLOUDBACKUP_ON_FAILURE", f"echo could not dump {SHOP_URL}")
    done = cloudbackup("--log-json", "run")
    assert done.returncode == 1
    for text in (done.stderr.decode(), log_file.read_text()):
        records = [json.loads(line) for line in text.splitlines()]
        assert records and all({"time", "level", "message"} <= set(r) for r in records)
        assert any(r["level"] == "error" and "shop" in r["message"] for r in records)
        assert any(
            r["message"] == "hook on-failure: could not dump postgresql://app:***@127.0.0.1:1/shop"
            for r in records
        )
        assert DB_PASSWORD not in text


# ---------------------------------------------------------------- findings against a bucket


def test_an_upload_failure_reads_the_same_in_backup_and_run(
    night: Env, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3: one result model, one wording: archived locally, upload failed."""
    monkeypatch.setenv("CLOUDBACKUP_S3_BUCKET", "no-such-bucket-here")
    monkeypatch.setenv("CLOUDBACKUP_RETRY_ATTEMPTS", "1")
    summaries = {}
    for command in ("backup", "run"):
        result = cli(command, "--json")
        assert result.exit_code == 1, result.stderr
        (row,) = json.loads(result.stdout)["results"]
        assert (row["archived"], row["uploaded"], row["ok"]) == (True, False, False), row
        assert row["result"] == "archived locally, upload failed"
        assert "NoSuchBucket" in row["error"]
        human = cli(command).stdout
        line = next(li for li in human.splitlines() if li.startswith("www "))
        assert "archived locally, upload failed" in line and "NoSuchBucket" in line, human
        summaries[command] = next(li for li in human.splitlines() if "source(s)" in li)
    assert summaries["backup"] == summaries["run"] == (
        "0 of 1 source(s) backed up; archived locally, upload failed: www"
    )
    assert len(night.archives("www")) == 4  # every archive is kept


def test_list_remote_names_the_hosts_that_have_backups(
    night: Env, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5: on a DR machine with another hostname."""
    assert cli("backup").exit_code == 0
    monkeypatch.setenv("CLOUDBACKUP_HOST", "dr-box")
    result = cli("list", "--where", "remote")
    assert result.exit_code == 0
    assert result.stdout.strip() == (
        "no backups found for host dr-box; the bucket has backups of testhost: "
        "pass --host NAME (or --all-hosts)"
    )
    document = json.loads(cli("list", "--where", "remote", "--json").stdout)
    assert document == {"backups": [], "hosts_with_backups": ["testhost"]}
    assert cli("list", "--where", "remote", "--host", "testhost").stdout.count("www-") == 1


def test_status_shows_local_and_remote_sizes_apart(night: Env, cli: Any) -> None:
    """10: not one sum of both copies."""
    assert cli("run").exit_code == 0
    (archive,) = night.archives("www")
    size = archive.stat().st_size
    document = json.loads(cli("status", "--json").stdout)
    (row,) = document["hosts"][0]["sources"]
    assert (row["local_bytes"], row["remote_bytes"], row["future_dated"]) == (size, size, [])
    table = cli("status").stdout.splitlines()
    assert table[0].split() == [
        "host", "source", "state", "newest", "age", "local/remote", "local", "size", "remote",
        "size", "why",
    ]  # fmt: skip
    assert re.search(rf"\b1/1\s+{size} B\s+{size} B\s*$", table[1]), table[1]


def test_remote_prune_reports_space_per_group_and_in_total(
    night: Env, cli: Any, clock: Clock, www: Path
) -> None:
    """15: what operators size buckets by."""
    for n in range(3):
        (www / f"n{n}.txt").write_text("x" * (1000 * (n + 1)))
        assert cli("backup", "--full").exit_code == 0  # independent: a chain keeps ancestors
        clock.advance(hours=1)
    args = ("prune", "--where", "remote", "--policy", "last=1", "--json")
    dry = json.loads(cli(*args, "--dry-run").stdout)
    (group,) = dry["results"]
    sizes = sorted((a.stat().st_size, a.name) for a in night.archives("www"))
    newest = max(night.archives("www")).stat().st_size
    assert group["kept_bytes"] == newest
    assert group["freed_bytes"] == sum(s for s, _ in sizes) - newest == dry["freed_bytes"]
    done = json.loads(cli(*args).stdout)
    assert done["results"][0]["freed_bytes"] == group["freed_bytes"]
    human = cli("prune", "--where", "all", "--policy", "last=1", "--dry-run").stdout
    assert "space         " in human and "would be freed; nothing deleted" in human


def test_run_and_verify_show_a_verify_result_alike(night: Env, cli: Any) -> None:
    """9: one wording for the same result."""
    ran = cli("run")
    assert ran.exit_code == 0
    (archive,) = night.archives("www")
    backup_id = archive.name.split(".")[0]
    verified = cli("verify", "--where", "remote", backup_id)
    (line,) = verified.stdout.splitlines()
    assert line.startswith(f"ok   remote {backup_id}: ")
    assert line in ran.stdout.splitlines()

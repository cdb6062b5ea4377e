"""age encryption, the parts: recipients and identity files read strictly, the child that
encrypts and decrypts (its verdicts, and nothing secret in its command line or environment),
names and manifests of encrypted backups, `key generate`, and the configuration rows."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cloudbackup import config
from cloudbackup.core.errors import CloudBackupError, ConfigError, IntegrityError
from cloudbackup.core.model import BackupId, BackupRef, archive_name, name_for, parse_name
from cloudbackup.ops.keys import generate_key
from cloudbackup.sources.registry import parse_manifest
from cloudbackup.stream import age
from tests.conftest import CliResult

AGE = shutil.which("age") or "/usr/bin/age"
AGE_KEYGEN = shutil.which("age-keygen") or "/usr/bin/age-keygen"


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    secret, public = age.generate_identity()
    other_secret, other_public = age.generate_identity()
    return {"secret": secret, "public": public, "other_secret": other_secret, "other": other_public}


def keyring(tmp_path: Path, *secrets: str) -> age.Keyring:
    path = tmp_path / f"key-{len(list(tmp_path.iterdir()))}.txt"
    path.write_text("".join(f"{s}\n" for s in secrets))
    return age.load_identities(path)


def encrypt(data: bytes, recipients: list[str]) -> bytes:
    out: list[bytes] = []
    stage = age.EncryptStage(recipients, lambda view: out.append(bytes(view)))
    for i in range(0, len(data), 300_000):
        stage.put(data[i : i + 300_000])
    stage.close()
    return b"".join(out)


def decrypt(data: bytes, ring: age.Keyring, recipients: list[str]) -> bytes:
    reader = age.Decryption(ring, tuple(recipients), "x.tar.zst.age").open(io.BytesIO(data))
    try:
        chunks = []
        while chunk := reader.read(1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        reader.close()


# ---------------------------------------------------------------- recipients


def test_recipients_by_commas_newlines_and_comments(keys: dict[str, str]) -> None:
    text = f"# ops team\n{keys['public']}, {keys['other']}  # the vault\n\n{keys['public']}\n"
    assert age.parse_recipients(text) == (keys["public"], keys["other"])


@pytest.mark.parametrize(
    "bad",
    [
        "age1notakey",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG",
        "AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ",
    ],
)
def test_a_bad_recipient_is_named(keys: dict[str, str], bad: str) -> None:
    with pytest.raises(ValueError, match="not (a valid )?an? ?age recipient|age recipient") as info:
        age.parse_recipients(f"{keys['public']}\n{bad}")
    assert repr(bad[:80]) in str(info.value)


def test_no_recipient_at_all_is_an_error() -> None:
    with pytest.raises(ValueError, match="no recipient"):
        age.parse_recipients("# only a comment\n\n")


def test_configuration_refuses_a_bad_recipient_at_start_up(keys: dict[str, str]) -> None:
    env = {"CLOUDBACKUP_AGE_RECIPIENTS": f"{keys['public']},age1typo"}
    with pytest.raises(ConfigError) as info:
        config.load({}, env, {}, hostname="h", home=Path("/root"))
    assert info.value.exit_code == 2
    assert "CLOUDBACKUP_AGE_RECIPIENTS" in str(info.value) and "'age1typo'" in str(info.value)


def test_recipients_file_with_comments(tmp_path: Path, keys: dict[str, str]) -> None:
    path = tmp_path / "recipients.txt"
    path.write_text(f"# backup recipients\n{keys['public']}\n\n# offline vault\n{keys['other']}\n")
    env = {"CLOUDBACKUP_AGE_RECIPIENTS_FILE": str(path)}
    settings = config.load({}, env, {}, hostname="h", home=Path("/root"))
    assert settings.age_recipients == (keys["public"], keys["other"])
    both = {**env, "CLOUDBACKUP_AGE_RECIPIENTS": keys["public"]}
    with pytest.raises(ConfigError, match="both set"):
        config.load({}, both, {}, hostname="h", home=Path("/root"))


# ---------------------------------------------------------------- identity files


def test_identity_file_as_age_keygen_writes_it(tmp_path: Path) -> None:
    path = tmp_path / "key.txt"
    subprocess.run([AGE_KEYGEN, "-o", str(path)], check=True, capture_output=True)
    public = subprocess.run(
        [AGE_KEYGEN, "-y", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()
    ring = age.load_identities(path)
    assert ring.recipients == (public,)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{secret}\nnot a key line\n", "line 2 is not an age identity"),
        ("# comment\n{secret}x\n", "line 2 is not a valid age identity"),
        ("# nothing but comments\n", "holds no identity"),
        ("age-encryption.org/v1\n-> scrypt abc 18\n", "is itself encrypted"),
        ("\xff\xfe{secret}", "not ASCII text"),
    ],
)
def test_identity_file_is_read_strictly_and_never_shown(
    tmp_path: Path, keys: dict[str, str], content: str, problem: str
) -> None:
    path = tmp_path / "key.txt"
    path.write_bytes(content.format(secret=keys["secret"]).encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        age.load_identities(path)
    assert problem in str(info.value) and info.value.exit_code == 2
    assert "AGE-SECRET-KEY" not in str(info.value).replace("AGE-SECRET-KEY-1...", "")
    assert keys["secret"][20:40] not in str(info.value)


def test_identity_file_that_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        age.load_identities(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="not a regular file"):
        age.load_identities(tmp_path)


def test_keyring_repr_holds_no_secret(tmp_path: Path, keys: dict[str, str]) -> None:
    ring = keyring(tmp_path, keys["secret"])
    assert keys["secret"] not in repr(ring) and keys["secret"] not in str(ring)
    assert keys["public"] in repr(ring)


# ---------------------------------------------------------------- the child


def test_round_trip_and_stock_age_decrypts_it(tmp_path: Path, keys: dict[str, str]) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    sealed = encrypt(data, [keys["public"], keys["other"]])
    assert sealed.startswith(b"age-encryption.org/v1\n")
    assert decrypt(sealed, keyring(tmp_path, keys["secret"]), [keys["public"]]) == data
    assert decrypt(sealed, keyring(tmp_path, keys["other_secret"]), [keys["other"]]) == data
    (tmp_path / "k").write_text(keys["secret"] + "\n")
    stock = subprocess.run(
        [AGE, "-d", "-i", str(tmp_path / "k")], input=sealed, capture_output=True, check=True
    )
    assert stock.stdout == data


def test_tampered_ciphertext_is_an_integrity_error(tmp_path: Path, keys: dict[str, str]) -> None:
    sealed = bytearray(encrypt(os.urandom(500_000), [keys["public"]]))
    sealed[len(sealed) // 2] ^= 0x01
    with pytest.raises(IntegrityError, match="fails age's authentication") as info:
        decrypt(bytes(sealed), keyring(tmp_path, keys["secret"]), [keys["public"]])
    assert info.value.exit_code == 3


def test_truncated_ciphertext_is_an_integrity_error(tmp_path: Path, keys: dict[str, str]) -> None:
    sealed = encrypt(os.urandom(200_000), [keys["public"]])
    with pytest.raises(IntegrityError, match="tampered or truncated"):
        decrypt(sealed[:-100], keyring(tmp_path, keys["secret"]), [keys["public"]])


def test_wrong_key_is_exit_2_and_a_damaged_stanza_exit_3(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    sealed = encrypt(b"data" * 1000, [keys["public"]])
    wrong = keyring(tmp_path, keys["other_secret"])
    with pytest.raises(ConfigError, match="no identity in .* matches the archive's recipients"):
        decrypt(sealed, wrong, [keys["public"]])
    # The stanza's body (the wrapped file key) damaged: the right key finds no match either;
    # the manifest's recipients tell it is the archive that changed.
    lines = sealed.split(b"\n")
    body = bytearray(lines[2])
    body[5] = ord("A") if body[5] != ord("A") else ord("B")
    damaged = b"\n".join([*lines[:2], bytes(body), *lines[3:]])
    with pytest.raises(IntegrityError, match="header is damaged") as info:
        decrypt(damaged, keyring(tmp_path, keys["secret"]), [keys["public"]])
    assert info.value.exit_code == 3


def test_garbage_is_not_an_age_file(tmp_path: Path, keys: dict[str, str]) -> None:
    with pytest.raises(IntegrityError):
        decrypt(b"\x28\xb5\x2f\xfd" + os.urandom(1000), keyring(tmp_path, keys["secret"]), [])


def test_decryption_refused_before_reading_without_the_right_identity(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    with pytest.raises(ConfigError, match="restore needs CLOUDBACKUP_AGE_IDENTITY_FILE"):
        age.decryption_for(None, [keys["public"]], "a.tar.zst.age", "restore")
    ring = keyring(tmp_path, keys["other_secret"])
    with pytest.raises(ConfigError, match="no identity .* matches the archive's recipients"):
        age.decryption_for(ring, [keys["public"]], "a.tar.zst.age", "restore")


class _Held(io.RawIOBase):
    """A stream that holds its first read until released (the child is running then)."""

    def __init__(self, data: bytes) -> None:
        self.data = io.BytesIO(data)
        self.release = threading.Event()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.release.wait(30)
        return self.data.read(size)


def _children() -> list[int]:
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                found.append(int(entry))
    return found


def test_the_child_gets_no_secret_in_argv_or_environment(
    tmp_path: Path, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_AGE_IDENTITY_FILE", str(tmp_path / "k.txt"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value")
    sealed = encrypt(b"payload" * 100, [keys["public"]])
    before = set(_children())
    held = _Held(sealed)
    reader = age.Decryption(keyring(tmp_path, keys["secret"]), (keys["public"],), "x").open(held)
    try:
        deadline = time.monotonic() + 10
        while not (new := set(_children()) - before) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert new, "no child process found"
        for pid in new:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert environ == b""
            for secret in (keys["secret"], "AGE-SECRET-KEY", "aws-secret-value", str(tmp_path)):
                assert secret.encode() not in argv and secret.encode() not in environ
    finally:
        held.release.set()
    assert reader.read(1 << 20).startswith(b"payload")
    reader.drain()
    reader.close()


def test_a_failing_sink_stops_the_encryption(keys: dict[str, str]) -> None:
    def full(chunk: memoryview) -> None:
        raise OSError(28, "No space left on device")

    stage = age.EncryptStage([keys["public"]], full)
    with pytest.raises(OSError) as info:
        for _ in range(200):
            stage.put(os.urandom(1 << 20))
        stage.close()
    assert info.value.errno == 28  # this process's own write failure, never a verdict
    stage.abort()


def test_encryption_without_pyrage_is_one_clear_error(
    keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.path", ["/nonexistent"])
    stage = age.EncryptStage([keys["public"]], lambda chunk: None)
    with pytest.raises(CloudBackupError, match="age encryption failed"):
        stage.put(b"x" * (4 << 20))
        stage.close()
    stage.abort()


# ---------------------------------------------------------------- names and manifests

BID = BackupId.parse("www-20261121T021500Z")


def test_encrypted_names() -> None:
    assert archive_name(BID, "zstd", encrypted=True) == "www-20261121T021500Z.tar.zst.age"
    assert archive_name(BID, "none", encrypted=True) == "www-20261121T021500Z.tar.age"
    key = name_for("cb", "web1", BID, "archive", "gzip", encrypted=True)
    parsed = parse_name(key, "cb")
    assert parsed is not None and parsed.encrypted and parsed.compression == "gzip"
    partial = parse_name(key + ".partial", "cb")
    assert partial is not None and partial.kind == "partial" and partial.encrypted
    plain = parse_name(name_for("cb", "web1", BID, "archive"), "cb")
    assert plain is not None and not plain.encrypted
    assert parse_name("cb/web1/www/www-20261121T021500Z.age", "cb") is None


def _manifest(keys: dict[str, str], **changes: Any) -> dict[str, Any]:
    data = {
        "format": 1,
        "id": str(BID),
        "host": "web1",
        "source": "www",
        "kind": "directory",
        "spec": "/srv/www",
        "created_at": "2026-11-21T02:15:00Z",
        "archive": "www-20261121T021500Z.tar.zst.age",
        "size": 10,
        "sha256": "0" * 64,
        "compression": "zstd",
        "file_count": 1,
        "uncompressed_bytes": 1,
        "machine_id": "m",
        "tool_version": "0",
        "encryption": "age",
        "recipients": [keys["public"]],
    }
    data.update(changes)
    return data


def _ref(archive: str = "www-20261121T021500Z.tar.zst.age") -> BackupRef:
    return BackupRef(
        "web1",
        "www",
        BID,
        "remote",
        archive_key=f"cb/web1/www/{archive}",
        manifest_key="cb/web1/www/www-20261121T021500Z.manifest.json",
    )


def test_manifest_of_an_encrypted_backup(keys: dict[str, str]) -> None:
    manifest = parse_manifest(json.dumps(_manifest(keys)), _ref())
    assert manifest.encrypted and manifest.recipients == [keys["public"]]
    again = parse_manifest(manifest.to_json(), _ref())
    assert again == manifest


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"recipients": []}, "not a list of age public keys"),
        ({"recipients": ["age1x"]}, "not a list of age public keys"),
        ({"recipients": "age1"}, "not a list of age public keys"),
        ({"encryption": "gpg"}, "unknown encryption"),
        ({"encryption": None}, "recipients but no encryption"),
        ({"archive": "www-20261121T021500Z.tar.zst"}, "names archive"),
    ],
)
def test_a_forged_encryption_record_is_an_integrity_failure(
    keys: dict[str, str], changes: dict[str, Any], problem: str
) -> None:
    with pytest.raises(IntegrityError, match=problem):
        parse_manifest(json.dumps(_manifest(keys, **changes)), _ref())


def test_a_plaintext_manifest_naming_an_encrypted_archive_is_refused(keys: dict[str, str]) -> None:
    plain = _manifest(keys, archive="www-20261121T021500Z.tar.zst")
    del plain["encryption"], plain["recipients"]
    with pytest.raises(IntegrityError, match="the archive listed is"):
        parse_manifest(json.dumps(plain), _ref())
    manifest = parse_manifest(json.dumps(plain), _ref("www-20261121T021500Z.tar.zst"))
    assert not manifest.encrypted and "recipients" not in manifest.to_dict()


# ---------------------------------------------------------------- key generate


def test_key_generate_to_a_new_file(tmp_path: Path, cli: Any) -> None:
    out = tmp_path / "key.txt"
    result: CliResult = cli("-q", "key", "generate", "--out", out)
    assert result.exit_code == 0, result.stderr
    ring = age.load_identities(out)
    assert result.stdout == f"Public key: {ring.recipients[0]}\n"
    assert (out.stat().st_mode & 0o777) == 0o600
    stock = subprocess.run([AGE_KEYGEN, "-y", str(out)], capture_output=True, text=True, check=True)
    assert stock.stdout.strip() == ring.recipients[0]
    secret = out.read_text()
    again = cli("key", "generate", "--out", out)
    assert again.exit_code == 2 and "never overwritten" in again.stderr
    assert out.read_text() == secret
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "elsewhere.txt")
    assert cli("key", "generate", "--out", link).exit_code == 2
    assert not (tmp_path / "elsewhere.txt").exists()


def test_key_generate_to_stdout_with_the_recipient_on_stderr(tmp_path: Path, cli: Any) -> None:
    result: CliResult = cli("key", "generate")
    assert result.exit_code == 0
    path = tmp_path / "k.txt"
    path.write_text(result.stdout)
    ring = age.load_identities(path)
    assert result.stderr == f"Public key: {ring.recipients[0]}\n"
    assert "AGE-SECRET-KEY-1" not in result.stderr


def test_generated_keys_differ(tmp_path: Path) -> None:
    one, two = generate_key(None), generate_key(None)
    assert one[1] != two[1] and one[0] != two[0]


# ---------------------------------------------------------------- indexes of encrypted backups


@pytest.mark.parametrize(
    ("encrypted", "index", "accepted"),
    [
        (True, "www-20261121T021500Z.index.zst.age", True),
        (True, "www-20261121T021500Z.index.zst", False),  # the plaintext index is never uploaded
        (False, "www-20261121T021500Z.index.zst", True),
        (False, "www-20261121T021500Z.index.zst.age", False),
    ],
)
def test_the_manifest_names_the_index_encrypted_like_its_archive(
    keys: dict[str, str], encrypted: bool, index: str, accepted: bool
) -> None:
    facts = {"name": index, "size": 3, "sha256": "1" * 64}
    data = _manifest(keys, index=facts)
    archive = "www-20261121T021500Z.tar.zst"
    if not encrypted:
        del data["encryption"], data["recipients"]
        data["archive"] = archive
    ref = _ref(archive + (".age" if encrypted else ""))
    if accepted:
        manifest = parse_manifest(json.dumps(data), ref)
        assert manifest.index is not None and manifest.index.name == index
    else:
        with pytest.raises(IntegrityError, match="index.name"):
            parse_manifest(json.dumps(data), ref)


def test_a_listing_keeps_both_indexes_of_an_encrypted_backup_and_deletion_removes_both() -> None:
    """The local dir holds the encrypted index (described by the manifest, uploaded) and the
    plaintext one (the next parent): the listing names the first as the index, the second
    as the plaintext index, and deleting the backup removes both."""
    from dataclasses import dataclass

    from cloudbackup.core.model import Listing, build_listing
    from cloudbackup.ops.deletion import local_keys, remote_keys

    @dataclass
    class Obj:
        key: str
        size: int = 1
        modified: Any = None

    names = [
        "www-20261121T021500Z.manifest.json",
        "www-20261121T021500Z.tar.zst.age",
        "www-20261121T021500Z.index.zst",
        "www-20261121T021500Z.index.zst.age",
    ]
    for order in (names, list(reversed(names))):
        listing: Listing = build_listing(
            [Obj(f"web1/www/{n}") for n in order], prefix="", where="local"
        )
        (ref,) = listing.refs
        assert ref.encrypted and not listing.orphans
        assert ref.index_key == "web1/www/www-20261121T021500Z.index.zst.age"
        assert ref.plain_index_key == "web1/www/www-20261121T021500Z.index.zst"
        for keys_of in (local_keys(listing), remote_keys):
            assert set(keys_of(ref)) == {f"web1/www/{n}" for n in names}

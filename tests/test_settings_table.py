"""The one table of variables: the generated docs, ``_FILE`` forms and per-source settings
(SPEC "Operations")."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from cloudbackup import config
from cloudbackup.core.errors import ConfigError
from cloudbackup.core.retention import parse_policy

ROOT = Path(__file__).resolve().parent.parent
HOME = Path("/home/tester")


def load(
    environ: dict[str, str] | None = None,
    dotenv: dict[str, str | None] | None = None,
    cli: dict[str, Any] | None = None,
) -> config.Settings:
    return config.load(cli or {}, environ or {}, dotenv or {}, hostname="machine", home=HOME)


def error(
    environ: dict[str, str],
    dotenv: dict[str, str | None] | None = None,
    cli: dict[str, Any] | None = None,
) -> str:
    with pytest.raises(ConfigError) as info:
        load(environ, dotenv, cli)
    assert info.value.exit_code == 2
    return str(info.value)


# ---------------------------------------------------------------- the table and its docs


def test_env_example_is_generated_from_the_table() -> None:
    assert (ROOT / ".env.example").read_text() == config.env_example(), (
        "run scripts/config-docs"
    )


def test_readme_tables_are_generated_from_the_table() -> None:
    readme = (ROOT / "README.md").read_text()
    assert config.readme_with_tables(readme) == readme, "run scripts/config-docs"
    assert config.readme_tables() in readme


def test_every_row_is_documented_and_sets_a_field() -> None:
    fields = {f.name for f in dataclasses.fields(config.Settings)}
    names = [row.name for row in config.VARIABLES]
    assert len(names) == len(set(names))
    for row in config.VARIABLES:
        assert row.name.startswith("CLOUDBACKUP_") and row.field in fields, row.name
        assert row.doc and "\n" not in row.doc, row.name
        assert row.tuning or row.name in config.env_example()
    per_source = {row.name for row in config.VARIABLES if row.per_source}
    assert per_source == {
        f"CLOUDBACKUP_{name}"
        for name in (
            "LOCAL_RETENTION",
            "REMOTE_RETENTION",
            "EXCLUDE",
            "COMPRESSION",
            "COMPRESSION_LEVEL",
            "SHRINK_GUARD",
            "FULL_EVERY",
            "INCREMENTAL_IGNORE_INODE",
        )
    }


def test_settings_defaults_are_the_tables() -> None:
    """No default is written twice: a Settings made with only the required fields equals
    what load() gives when nothing is set."""
    bare = config.Settings(local_dir=HOME / ".local/share/cloudbackup", host="machine")
    loaded = load()
    for row in config.VARIABLES:
        assert getattr(bare, row.field) == getattr(loaded, row.field), row.name
    assert bare.compression_level == loaded.compression_level == 3


def test_the_module_prints_the_example_and_the_tables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert config.main(["--env-example"]) == 0
    assert capsys.readouterr().out == config.env_example()
    assert config.main(["--readme-tables"]) == 0
    assert capsys.readouterr().out == config.readme_tables()
    assert config.main(["--other"]) == 2


def test_the_generated_example_loads_cleanly(tmp_path: Path) -> None:
    """Every active line of .env.example is a valid value, and no line is unknown."""
    from dotenv import dotenv_values

    example = tmp_path / "example.env"
    example.write_text(config.env_example())
    settings = load(dotenv=dict(dotenv_values(example)))
    assert settings.warnings == ()
    assert [s.name for s in settings.sources] == ["www", "app"]
    commented = {
        line[1:].split("=", 1)[0]: line[1:].split("=", 1)[1]
        for line in config.env_example().splitlines()
        if line.startswith("#CLOUDBACKUP_")
    }
    commented.pop("CLOUDBACKUP_S3_KMS_KEY_ID")  # needs aws:kms, shown with it
    commented.pop("CLOUDBACKUP_S3_COMPAT")  # warns that tags are then not sent
    commented.pop("CLOUDBACKUP_LOCAL_ONLY")  # warns that the bucket is used all the same
    commented.pop("CLOUDBACKUP_DEST")  # instead of the bucket: both set is refused
    assert load(dotenv={**dotenv_values(example), **commented}).warnings == ()


def test_unknown_variables_come_from_the_table() -> None:
    settings = load(
        {
            "CLOUDBACKUP_S3_BUCKET_FILE": "",
            "CLOUDBACKUP_LOG_FILE_FILE": "/x",
            "CLOUDBACKUP_EXCLUDE__WWW": "*.tmp",
            "CLOUDBACKUP_EXCLUDES__WWW": "*.tmp",
        }
    )
    warned = "\n".join(settings.warnings)
    assert "CLOUDBACKUP_LOG_FILE_FILE" in warned, "LOG_FILE already ends in _FILE"
    assert "CLOUDBACKUP_EXCLUDES__WWW" in warned
    assert len(settings.warnings) == 2


def test_local_only_with_a_bucket_is_warned_about() -> None:
    settings = load({"CLOUDBACKUP_LOCAL_ONLY": "1", "CLOUDBACKUP_S3_BUCKET": "bkt"})
    (warning,) = settings.warnings
    assert "CLOUDBACKUP_LOCAL_ONLY=1 is ignored" in warning and "CLOUDBACKUP_S3_BUCKET" in warning
    assert load({"CLOUDBACKUP_LOCAL_ONLY": "1"}).warnings == ()


# ---------------------------------------------------------------- _FILE forms


def secret_file(tmp_path: Path, content: bytes | str, name: str = "value") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(0o600)
    return path


def test_a_value_from_a_file_loses_its_trailing_newlines(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "my-bucket\n\n")
    assert load({"CLOUDBACKUP_S3_BUCKET_FILE": str(path)}).s3_bucket == "my-bucket"
    sources = secret_file(tmp_path, "/srv/www\r\n/srv/db\r\n", "sources")
    loaded = load(dotenv={"CLOUDBACKUP_SOURCES_FILE": str(sources)})
    assert [s.name for s in loaded.sources] == ["www", "db"]


def test_a_password_from_a_file_is_redacted_and_never_in_an_error(tmp_path: Path) -> None:
    good = secret_file(tmp_path, "postgresql://backup:s3cretPW@db.example/shop\n")
    (spec,) = load({"CLOUDBACKUP_SOURCES_FILE": str(good)}).sources
    assert "s3cretPW" in spec.secrets and "s3cretPW" not in spec.redacted
    bad = secret_file(tmp_path, "postgresql://backup:s3cretPW@db.example:99x/shop\n", "bad")
    message = error({"CLOUDBACKUP_SOURCES_FILE": str(bad)})
    assert "s3cretPW" not in message
    assert f"read from {bad} by CLOUDBACKUP_SOURCES_FILE" in message


def test_an_invalid_value_from_a_file_names_the_file(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "lz4\n")
    message = error({"CLOUDBACKUP_COMPRESSION_FILE": str(path)})
    assert "CLOUDBACKUP_COMPRESSION='lz4'" in message
    assert f"environment, read from {path} by CLOUDBACKUP_COMPRESSION_FILE" in message


@pytest.mark.parametrize("place", ["environment", ".env file"])
def test_both_forms_in_one_place_is_exit_2(tmp_path: Path, place: str) -> None:
    path = secret_file(tmp_path, "a-bucket")
    both = {"CLOUDBACKUP_S3_BUCKET": "b-bucket", "CLOUDBACKUP_S3_BUCKET_FILE": str(path)}
    message = error(both) if place == "environment" else error({}, dict(both))
    assert "CLOUDBACKUP_S3_BUCKET and CLOUDBACKUP_S3_BUCKET_FILE are both set" in message
    assert place in message


def test_the_forms_in_two_places_follow_the_precedence(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "from-file")
    env_file_form = load(
        {"CLOUDBACKUP_S3_BUCKET_FILE": str(path)}, {"CLOUDBACKUP_S3_BUCKET": "dot"}
    )
    assert env_file_form.s3_bucket == "from-file"
    env_value = load({"CLOUDBACKUP_S3_BUCKET": "env"}, {"CLOUDBACKUP_S3_BUCKET_FILE": str(path)})
    assert env_value.s3_bucket == "env"
    cli = load({"CLOUDBACKUP_S3_BUCKET_FILE": str(path)}, cli={"CLOUDBACKUP_S3_BUCKET": "cli"})
    assert cli.s3_bucket == "cli"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: d / "missing", ["does not exist"]),
        (lambda d: d, ["is a directory"]),
        (lambda d: secret_file(d, b"caf\xe9\n"), ["not valid UTF-8", "line 1"]),
        (lambda d: secret_file(d, b"a\0b"), ["NUL"]),
        (lambda d: secret_file(d, b"x" * (1024 * 1024 + 1)), ["larger than 1 MiB"]),
        (lambda d: Path("relative/bucket"), ["use an absolute path"]),
    ],
    ids=["missing", "directory", "latin-1", "nul", "huge", "relative"],
)
def test_an_unusable_file_is_exit_2_naming_it(tmp_path: Path, make: Any, words: list[str]) -> None:
    path = make(tmp_path)
    message = error({"CLOUDBACKUP_S3_BUCKET_FILE": str(path)})
    assert "CLOUDBACKUP_S3_BUCKET_FILE" in message and str(path) in message
    for word in words:
        assert word in message


def test_an_unreadable_file_is_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = secret_file(tmp_path, "bucket")
    path.chmod(0)
    real_open = os.open

    def refusing(target: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(target) == str(path):  # root reads any file: refuse as for a user
            raise PermissionError(13, "Permission denied", str(target))
        return real_open(target, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    message = error({"CLOUDBACKUP_S3_BUCKET_FILE": str(path)})
    assert "cannot be read" in message and "Permission denied" in message


def test_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in error({"CLOUDBACKUP_PING_URL_FILE": str(fifo)})


def test_an_empty_file_is_an_empty_value(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "\n")
    assert load({"CLOUDBACKUP_REMOTE_RETENTION_FILE": str(path)}).remote_retention == (
        parse_policy("")
    )
    assert load({"CLOUDBACKUP_COMPRESSION_FILE": str(path)}).compression == "zstd"


# ---------------------------------------------------------------- per-source settings

SOURCES = "/srv/www\napp-db=sqlite:///var/lib/app.db"


def test_for_source_gives_each_source_its_values() -> None:
    settings = load(
        {
            "CLOUDBACKUP_SOURCES": SOURCES,
            "CLOUDBACKUP_REMOTE_RETENTION": "daily=7",
            "CLOUDBACKUP_REMOTE_RETENTION__APP_DB": "hourly=24,daily=7",
            "CLOUDBACKUP_LOCAL_RETENTION__APP_DB": "last=24",
            "CLOUDBACKUP_EXCLUDE": "*.tmp",
            "CLOUDBACKUP_EXCLUDE__WWW": "cache",
            "CLOUDBACKUP_SHRINK_GUARD__WWW": "off",
            "CLOUDBACKUP_COMPRESSION__APP_DB": "none",
        }
    )
    www, db = settings.for_source("www"), settings.for_source("app-db")
    assert (www.exclude, db.exclude) == (("cache",), ("*.tmp",))
    assert (www.shrink_guard, db.shrink_guard) == (None, 0.5)
    assert (www.compression, www.compression_level) == ("zstd", 3)
    assert (db.compression, db.compression_level) == ("none", None)
    assert www.remote_retention == parse_policy("daily=7")
    assert db.remote_retention == parse_policy("hourly=24,daily=7")
    assert (www.local_retention, db.local_retention) == (
        parse_policy("last=3"),
        parse_policy("last=24"),
    )
    assert settings.for_source("other") == settings
    assert settings.overridden("remote_retention") and not settings.overridden("log_level")


def test_a_per_source_value_from_the_env_file_beats_a_global_one_from_the_environment() -> None:
    settings = load(
        {"CLOUDBACKUP_LOCAL_RETENTION": "last=5"}, {"CLOUDBACKUP_LOCAL_RETENTION__WWW": "last=9"}
    )
    assert settings.for_source("www").local_retention == parse_policy("last=9")
    assert settings.for_source("db").local_retention == parse_policy("last=5")
    both = load(
        {"CLOUDBACKUP_LOCAL_RETENTION__WWW": "last=1"},
        {"CLOUDBACKUP_LOCAL_RETENTION__WWW": "last=9"},
    )
    assert both.for_source("www").local_retention == parse_policy("last=1")


def test_the_command_line_beats_a_per_source_value() -> None:
    settings = load(
        {"CLOUDBACKUP_COMPRESSION__WWW": "xz", "CLOUDBACKUP_EXCLUDE__WWW": "cache"},
        cli={"CLOUDBACKUP_COMPRESSION": "gzip", "extra_exclude": ["*.log"]},
    )
    www = settings.for_source("www")
    assert (www.compression, www.compression_level) == ("gzip", 6)
    assert www.exclude == ("cache", "*.log")
    assert settings.for_source("db").exclude == ("*.log",)


def test_a_level_belongs_to_its_codec() -> None:
    settings = load(
        {
            "CLOUDBACKUP_COMPRESSION_LEVEL": "19",
            "CLOUDBACKUP_COMPRESSION__A": "gzip",
            "CLOUDBACKUP_COMPRESSION__B": "gzip",
            "CLOUDBACKUP_COMPRESSION_LEVEL__B": "1",
            "CLOUDBACKUP_COMPRESSION_LEVEL__C": "5",
            "CLOUDBACKUP_COMPRESSION__D": "zstd",
        }
    )
    levels = {name: settings.for_source(name).compression_level for name in "abcde"}
    assert levels == {"a": 6, "b": 1, "c": 5, "d": 19, "e": 19}
    message = error(
        {"CLOUDBACKUP_COMPRESSION__A": "gzip", "CLOUDBACKUP_COMPRESSION_LEVEL__A": "12"}
    )
    assert "CLOUDBACKUP_COMPRESSION_LEVEL__A='12'" in message and "between 1 and 9" in message


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CLOUDBACKUP_LOCAL_RETENTION__WWW", "dayly=7"),
        ("CLOUDBACKUP_REMOTE_RETENTION__WWW", "daily=7,,weekly=4"),
        ("CLOUDBACKUP_COMPRESSION__WWW", "lz4"),
        ("CLOUDBACKUP_COMPRESSION_LEVEL__WWW", "high"),
        ("CLOUDBACKUP_SHRINK_GUARD__WWW", "150%"),
    ],
)
def test_an_invalid_per_source_value_names_its_variable(var: str, value: str) -> None:
    message = error({var: value})
    assert var in message and value in message and "(environment)" in message


def test_with_sources_configured_an_override_must_name_one() -> None:
    message = error({"CLOUDBACKUP_SOURCES": SOURCES, "CLOUDBACKUP_EXCLUDE__WEB": "*.tmp"})
    assert "CLOUDBACKUP_EXCLUDE__WEB" in message and "names no source" in message
    assert "APP_DB" in message and "WWW" in message
    loaded = load({"CLOUDBACKUP_SOURCES": SOURCES, "CLOUDBACKUP_EXCLUDE__APP_DB": "*.tmp"})
    assert loaded.for_source("app-db").exclude == ("*.tmp",)


def test_without_sources_configured_overrides_apply_by_name() -> None:
    """A central pruner, or an ad-hoc `backup PATH`: nothing to check them against."""
    settings = load({"CLOUDBACKUP_LOCAL_RETENTION__WEB": "last=1"})
    assert settings.for_source("web").local_retention == parse_policy("last=1")
    adhoc = load(
        {"CLOUDBACKUP_SOURCES": SOURCES, "CLOUDBACKUP_COMPRESSION__SITE": "gzip"},
        cli={"sources": ["site=/srv/site"]},
    )
    assert adhoc.for_source("site").compression == "gzip"


def test_two_sources_on_one_suffix_is_exit_2() -> None:
    message = error({"CLOUDBACKUP_SOURCES": "a-b=/srv/x\na.b=/srv/y"})
    assert "'a-b' and 'a.b'" in message and "A_B" in message
    assert [s.name for s in load(cli={"sources": ["a-b=/srv/x", "a.b=/srv/y"]}).sources] == [
        "a-b",
        "a.b",
    ]


def test_a_setting_that_cannot_be_per_source_is_exit_2() -> None:
    message = error({"CLOUDBACKUP_S3_BUCKET__WWW": "other"})
    assert "CLOUDBACKUP_S3_BUCKET__WWW" in message and "cannot be set per source" in message


@pytest.mark.parametrize("suffix", ["www", "W-W", ""])
def test_a_suffix_that_is_no_source_name_is_exit_2(suffix: str) -> None:
    message = error({f"CLOUDBACKUP_EXCLUDE__{suffix}": "x"})
    assert "upper-cased" in str(message)


def test_per_source_file_forms(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "hourly=24\n")
    settings = load(
        {"CLOUDBACKUP_SOURCES": SOURCES, "CLOUDBACKUP_REMOTE_RETENTION__WWW_FILE": str(path)}
    )
    assert settings.for_source("www").remote_retention == parse_policy("hourly=24")
    both = {
        "CLOUDBACKUP_REMOTE_RETENTION__WWW": "last=1",
        "CLOUDBACKUP_REMOTE_RETENTION__WWW_FILE": str(path),
    }
    assert "both set" in error(both)


def test_a_source_whose_suffix_ends_in_file(tmp_path: Path) -> None:
    """``..__CONFIG_FILE``: the excludes of source ``config-file`` when it is configured,
    else the file form of ``..__CONFIG``."""
    configured = load(
        {
            "CLOUDBACKUP_SOURCES": "config-file=/etc/app",
            "CLOUDBACKUP_EXCLUDE__CONFIG_FILE": "*.bak",
        }
    )
    assert configured.for_source("config-file").exclude == ("*.bak",)
    path = secret_file(tmp_path, "*.old")
    unconfigured = load({"CLOUDBACKUP_EXCLUDE__CONFIG_FILE": str(path)})
    assert unconfigured.for_source("config").exclude == ("*.old",)
    ambiguous = {
        "CLOUDBACKUP_SOURCES": "config-file=/etc/app\nconfig=/etc/other",
        "CLOUDBACKUP_EXCLUDE__CONFIG_FILE": "*.bak",
    }
    assert "ambiguous" in error(ambiguous)


# ---------------------------------------------------------------- one variable alone


def test_one_variable_resolves_when_others_are_invalid(tmp_path: Path) -> None:
    environ = {"CLOUDBACKUP_COMPRESSION": "rar", "CLOUDBACKUP_PING_URL": "https://hc.example/u/"}
    assert "CLOUDBACKUP_COMPRESSION" in error(environ)
    assert config.resolve_one("ping_url", {}, environ, {}) == "https://hc.example/u"
    path = secret_file(tmp_path, "https://hc.example/file\n")
    from_file = {"CLOUDBACKUP_PING_URL_FILE": str(path)}
    assert config.resolve_one("ping_url", {}, {}, from_file) == "https://hc.example/file"
    assert config.resolve_one("ping_url", {}, {"CLOUDBACKUP_PING_URL": "nope"}, {}) is None
    assert config.resolve_one("ping_url", {}, {}, {}) is None

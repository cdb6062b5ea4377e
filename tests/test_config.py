"""config.load: precedence, validation (every error names the variable and the bad value),
unknown variables, and source lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cloudbackup import config
from cloudbackup.config import ObjectLock
from cloudbackup.core.errors import ConfigError

HOME = Path("/home/tester")


def load(
    cli: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    dotenv: dict[str, str | None] | None = None,
) -> config.Settings:
    return config.load(cli or {}, environ or {}, dotenv or {}, hostname="machine", home=HOME)


def load_error(environ: dict[str, str], cli: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(cli, environ)
    assert info.value.exit_code == 2
    return str(info.value)


# ---------------------------------------------------------------- defaults and precedence


def test_defaults() -> None:
    settings = load()
    assert settings.local_dir == HOME / ".local" / "share" / "cloudbackup"
    assert settings.host == "machine"
    assert settings.compression == "zstd"
    assert settings.compression_level == 3
    assert settings.s3_bucket is None
    assert settings.s3_prefix == "cloudbackup"
    assert settings.s3_storage_class == "STANDARD"
    assert settings.shrink_guard == 0.5
    assert settings.retry_attempts == 5
    assert settings.log_level == "INFO"
    assert settings.remote_retention is None
    assert settings.sources == ()
    assert settings.warnings == ()


def test_xdg_data_home_sets_the_default_local_dir() -> None:
    assert load(environ={"XDG_DATA_HOME": "/xdg"}).local_dir == Path("/xdg/cloudbackup")


@pytest.mark.parametrize(
    ("var", "attr", "values", "default"),
    [
        ("CLOUDBACKUP_COMPRESSION", "compression", ("gzip", "xz", "bzip2"), "zstd"),
        ("CLOUDBACKUP_HOST", "host", ("cli-host", "env-host", "dot-host"), "machine"),
        ("CLOUDBACKUP_LOCAL_DIR", "local_dir", (Path("/c"), Path("/e"), Path("/d")), None),
        ("CLOUDBACKUP_S3_PREFIX", "s3_prefix", ("cli/p", "env", "dot"), "cloudbackup"),
        ("CLOUDBACKUP_LOG_LEVEL", "log_level", ("DEBUG", "WARNING", "ERROR"), "INFO"),
        ("CLOUDBACKUP_RETRY_ATTEMPTS", "retry_attempts", (7, 8, 9), 5),
        ("CLOUDBACKUP_S3_BUCKET", "s3_bucket", ("cli-bucket", "env-bucket", "dot-bucket"), None),
    ],
)
def test_precedence_cli_over_env_over_dotenv_over_default(
    var: str, attr: str, values: tuple[Any, Any, Any], default: Any
) -> None:
    cli_value, env_value, dot_value = (str(v) for v in values)
    cli_expected, env_expected, dot_expected = values
    both = {var: env_value}
    dot = {var: dot_value}
    assert getattr(load({var: cli_value}, both, dot), attr) == cli_expected
    assert getattr(load({var: None}, both, dot), attr) == env_expected
    assert getattr(load({}, {}, dot), attr) == dot_expected
    if default is not None:
        assert getattr(load(), attr) == default


def test_sources_argument_replaces_the_variable() -> None:
    settings = load({"sources": ["/srv/a"]}, {"CLOUDBACKUP_SOURCES": "/srv/b,/srv/c"})
    assert [s.name for s in settings.sources] == ["a"]
    assert [s.name for s in load({}, {}, {"CLOUDBACKUP_SOURCES": "/srv/d"}).sources] == ["d"]


def test_extra_exclude_adds_to_the_variable() -> None:
    settings = load({"extra_exclude": ["*.log"]}, {"CLOUDBACKUP_EXCLUDE": "*.tmp,node_modules"})
    assert settings.exclude == ("*.tmp", "node_modules", "*.log")


def test_error_says_where_the_value_came_from() -> None:
    assert "(.env file)" in str(_raises(lambda: load({}, {}, {"CLOUDBACKUP_COMPRESSION": "lz4"})))
    assert "(environment)" in load_error({"CLOUDBACKUP_COMPRESSION": "lz4"})
    assert "(command line)" in str(_raises(lambda: load({"CLOUDBACKUP_COMPRESSION": "lz4"})))


def _raises(call: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call()
    return info.value


def test_dotenv_key_without_value_is_unset() -> None:
    assert load({}, {}, {"CLOUDBACKUP_COMPRESSION": None}).compression == "zstd"


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CLOUDBACKUP_COMPRESSION", "zip"),
        ("CLOUDBACKUP_COMPRESSION", "lz4"),
        ("CLOUDBACKUP_S3_BUCKET", "My_Bucket"),
        ("CLOUDBACKUP_S3_BUCKET", "ab"),
        ("CLOUDBACKUP_S3_BUCKET", "-bucket"),
        ("CLOUDBACKUP_S3_BUCKET", "b" * 64),
        ("CLOUDBACKUP_S3_BUCKET", "my..bucket"),  # AWS: no two adjacent periods
        ("CLOUDBACKUP_S3_BUCKET", "192.168.5.4"),  # AWS: not formatted as an IP address
        ("CLOUDBACKUP_S3_STORAGE_CLASS", "GLACIER"),
        ("CLOUDBACKUP_S3_STORAGE_CLASS", "DEEP_ARCHIVE"),
        ("CLOUDBACKUP_S3_STORAGE_CLASS", "SILVER"),
        ("CLOUDBACKUP_S3_SSE", "KMS"),
        ("CLOUDBACKUP_S3_SSE", "aws:kms:dsse"),
        ("CLOUDBACKUP_S3_OBJECT_LOCK", "30d"),
        ("CLOUDBACKUP_S3_OBJECT_LOCK", "governance:30"),
        ("CLOUDBACKUP_S3_OBJECT_LOCK", "governance:0d"),
        ("CLOUDBACKUP_S3_OBJECT_LOCK", "compliance:12h"),
        ("CLOUDBACKUP_S3_OBJECT_LOCK", "forever:30d"),
        ("CLOUDBACKUP_S3_TAGS", "novalue"),
        ("CLOUDBACKUP_S3_TAGS", "cloudbackup:source=x"),
        ("CLOUDBACKUP_S3_TAGS", "aws:createdBy=me"),
        ("CLOUDBACKUP_S3_TAGS", "team=a,team=b"),
        ("CLOUDBACKUP_S3_TAGS", ",".join(f"k{i}=v{i}" for i in range(8))),
        ("CLOUDBACKUP_SHRINK_GUARD", "150%"),
        ("CLOUDBACKUP_SHRINK_GUARD", "50"),
        ("CLOUDBACKUP_SHRINK_GUARD", "lots"),
        ("CLOUDBACKUP_RETRY_ATTEMPTS", "0"),
        ("CLOUDBACKUP_RETRY_ATTEMPTS", "-3"),
        ("CLOUDBACKUP_RETRY_ATTEMPTS", "five"),
        ("CLOUDBACKUP_LOG_LEVEL", "VERBOSE"),
        ("CLOUDBACKUP_LOG_LEVEL", "trace"),
        ("CLOUDBACKUP_LOCAL_DIR", "backups/here"),
        ("CLOUDBACKUP_LOG_FILE", "cloudbackup.log"),
        ("CLOUDBACKUP_LOCAL_RETENTION", "dayly=7"),
        ("CLOUDBACKUP_LOCAL_RETENTION", "last=three"),
        ("CLOUDBACKUP_REMOTE_RETENTION", "daily=7,,weekly=4"),
        ("CLOUDBACKUP_REMOTE_RETENTION", "within=3 days"),
        ("CLOUDBACKUP_HOST", "my host"),
        ("CLOUDBACKUP_LOCAL_ONLY", "maybe"),
        ("CLOUDBACKUP_S3_ENDPOINT_URL", "minio:9000"),
        ("CLOUDBACKUP_S3_ENDPOINT_URL", "http://[::1"),
        ("CLOUDBACKUP_S3_ENDPOINT_URL", "https://:9000"),
        ("CLOUDBACKUP_PING_URL", "hc-ping.com/uuid"),
        ("CLOUDBACKUP_PING_URL", "https://hc-ping.com:port/uuid"),
        ("CLOUDBACKUP_S3_PART_SIZE", "6GiB"),
        ("CLOUDBACKUP_S3_OBJECT_LOCK", "governance:36501d"),
    ],
)
def test_invalid_value_names_variable_and_value(var: str, value: str) -> None:
    message = load_error({var: value})
    assert var in message
    assert value in message


@pytest.mark.parametrize(
    ("compression", "bad", "good"),
    [
        ("zstd", ["0", "20", "-1"], ["1", "19"]),
        ("gzip", ["0", "10"], ["1", "9"]),
        ("bzip2", ["0", "10"], ["1", "9"]),
        ("xz", ["-1", "10"], ["0", "9"]),
    ],
)
def test_compression_level_range_per_codec(
    compression: str, bad: list[str], good: list[str]
) -> None:
    for level in bad:
        message = load_error(
            {"CLOUDBACKUP_COMPRESSION": compression, "CLOUDBACKUP_COMPRESSION_LEVEL": level}
        )
        assert "CLOUDBACKUP_COMPRESSION_LEVEL" in message and repr(level) in message
    for level in good:
        settings = load(
            {}, {"CLOUDBACKUP_COMPRESSION": compression, "CLOUDBACKUP_COMPRESSION_LEVEL": level}
        )
        assert settings.compression_level == int(level)


def test_compression_level_not_a_number() -> None:
    message = load_error({"CLOUDBACKUP_COMPRESSION_LEVEL": "high"})
    assert "CLOUDBACKUP_COMPRESSION_LEVEL" in message and "'high'" in message


def test_zip_gets_a_reason() -> None:
    assert "loses Unix owners" in load_error({"CLOUDBACKUP_COMPRESSION": "zip"})


@pytest.mark.parametrize("sse", [None, "AES256"])
def test_kms_key_needs_aws_kms(sse: str | None) -> None:
    environ = {"CLOUDBACKUP_S3_KMS_KEY_ID": "alias/backup"}
    if sse:
        environ["CLOUDBACKUP_S3_SSE"] = sse
    message = load_error(environ)
    assert "CLOUDBACKUP_S3_KMS_KEY_ID" in message and "alias/backup" in message


def test_kms_key_with_aws_kms_is_accepted() -> None:
    settings = load(
        {}, {"CLOUDBACKUP_S3_SSE": "aws:kms", "CLOUDBACKUP_S3_KMS_KEY_ID": "alias/backup"}
    )
    assert (settings.s3_sse, settings.s3_kms_key_id) == ("aws:kms", "alias/backup")


@pytest.mark.parametrize("storage_class", config.STORAGE_CLASSES)
def test_instant_read_storage_classes_accepted(storage_class: str) -> None:
    environ = {"CLOUDBACKUP_S3_STORAGE_CLASS": storage_class.lower()}
    assert load({}, environ).s3_storage_class == storage_class


def test_object_lock_parsed() -> None:
    lock = load({}, {"CLOUDBACKUP_S3_OBJECT_LOCK": "Compliance:90d"}).s3_object_lock
    assert lock == ObjectLock("COMPLIANCE", 90)
    assert str(lock) == "compliance:90d"


def test_seven_tags_accepted() -> None:
    text = ",".join(f"k{i}=v{i}" for i in range(7))
    assert len(load({}, {"CLOUDBACKUP_S3_TAGS": text}).s3_tags) == 7


def test_tags_parsed_in_order() -> None:
    settings = load({}, {"CLOUDBACKUP_S3_TAGS": "team=ops, cost-center=42"})
    assert settings.s3_tags == (("team", "ops"), ("cost-center", "42"))


@pytest.mark.parametrize(
    ("text", "expected"), [("25%", 0.25), ("100%", 1.0), ("off", None), ("0", None)]
)
def test_shrink_guard_values(text: str, expected: float | None) -> None:
    assert load({}, {"CLOUDBACKUP_SHRINK_GUARD": text}).shrink_guard == expected


def test_retention_policies_parsed() -> None:
    settings = load(
        {},
        {
            "CLOUDBACKUP_LOCAL_RETENTION": "last=5",
            "CLOUDBACKUP_REMOTE_RETENTION": "daily=7,weekly=4,monthly=12",
        },
    )
    assert settings.local_retention != load().local_retention
    assert settings.remote_retention is not None


def test_log_level_case_insensitive() -> None:
    assert load({}, {"CLOUDBACKUP_LOG_LEVEL": "debug"}).log_level == "DEBUG"


# ---------------------------------------------------------------- unknown variables


def test_unknown_variable_warned_by_name() -> None:
    settings = load(
        {},
        {"CLOUDBACKUP_S3_BUKET": "x", "PATH": "/bin", "CLOUDBACKUP_HOST": "h"},
        {"CLOUDBACKUP_COMPRESION": "gzip"},
    )
    text = "\n".join(settings.warnings)
    assert "CLOUDBACKUP_S3_BUKET" in text
    assert "CLOUDBACKUP_COMPRESION" in text
    assert "PATH" not in text
    assert "CLOUDBACKUP_HOST" not in text
    assert len(settings.warnings) == 2


def test_every_variable_the_loader_reads_is_known() -> None:
    """A variable read by ``load`` but missing from the lists would be warned as a typo."""
    import inspect
    import re

    read = set(re.findall(r'"(CLOUDBACKUP_[A-Z0-9_]+)"', inspect.getsource(config.load)))
    read |= set(re.findall(r'"(CLOUDBACKUP_[A-Z0-9_]+)"', inspect.getsource(config)))
    known = set(config.KNOWN_VARIABLES) | set(config.EXTRA_VARIABLES)
    assert "CLOUDBACKUP_S3_DOWNLOAD" in read
    assert read - known == set()
    assert load({}, {"CLOUDBACKUP_S3_DOWNLOAD": "ranged"}).warnings == ()


def test_upload_mode_knob() -> None:
    assert load().s3_upload == "stream"
    assert load({}, {"CLOUDBACKUP_S3_UPLOAD": "After"}).s3_upload == "after"
    message = load_error({"CLOUDBACKUP_S3_UPLOAD": "later"})
    assert "CLOUDBACKUP_S3_UPLOAD" in message and "later" in message


# ---------------------------------------------------------------- sources


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("/srv/www\n/srv/db\n", ["www", "db"]),
        ("/srv/www,/srv/db", ["www", "db"]),
        ("/srv/www , /srv/db ,", ["www", "db"]),
        ("conf=/opt/app/**/*.{yaml,json},/srv/www", ["conf", "www"]),
        ("conf=/opt/app/**/*.{yaml,json}\n\n  /srv/www  \n", ["conf", "www"]),
        ("conf=/opt/{a,{b,c}}/*.conf,/srv/www", ["conf", "www"]),
    ],
)
def test_sources_split_on_newlines_or_commas_outside_braces(text: str, names: list[str]) -> None:
    settings = load({}, {"CLOUDBACKUP_SOURCES": text})
    assert [s.name for s in settings.sources] == names
    if names[0] == "conf":
        assert settings.sources[0].kind == "glob"
        spec = settings.sources[0].spec
        assert spec.startswith("/opt/") and "," in spec and spec.count("{") == spec.count("}")


def test_exclude_split_like_sources() -> None:
    settings = load({}, {"CLOUDBACKUP_EXCLUDE": "*.tmp\n**/cache/**\n"})
    assert settings.exclude == ("*.tmp", "**/cache/**")
    assert load({}, {"CLOUDBACKUP_EXCLUDE": "*.tmp,{a,b}/cache"}).exclude == (
        "*.tmp",
        "{a,b}/cache",
    )


@pytest.mark.parametrize(
    "text",
    ["/a/www,/b/www", "www=/srv/site,/srv/www", "app=/srv/x\nsqlite:///var/lib/app.db"],
)
def test_duplicate_source_names_rejected(text: str) -> None:
    message = load_error({"CLOUDBACKUP_SOURCES": text})
    assert "two sources are named" in message


@pytest.mark.parametrize(
    ("spec", "word"),
    [("/opt/app/**/*.conf", "glob"), ("cmd:mysqldump shop", "command")],
)
def test_glob_and_cmd_need_a_name(spec: str, word: str) -> None:
    message = load_error({"CLOUDBACKUP_SOURCES": spec})
    assert spec in message
    assert word in message and "name" in message


@pytest.mark.parametrize(
    ("spec", "name", "kind"),
    [
        ("/srv/www", "www", "directory"),
        ("/srv/www/", "www", "directory"),
        ("sqlite:///var/lib/app/app.db", "app", "sqlite"),
        ("postgresql://user@db.example:5432/shop", "shop", "postgresql"),
        ("postgres://user:pw@db.example/inventory", "inventory", "postgresql"),
        ("conf=/opt/app/config/**/*.{yaml,json}", "conf", "glob"),
        ("shop=cmd:mysqldump --single-transaction shop", "shop", "command"),
        ("site=/srv/www", "site", "directory"),
    ],
)
def test_default_and_explicit_source_names(spec: str, name: str, kind: str) -> None:
    (source,) = load({"sources": [spec]}).sources
    assert (source.name, source.kind) == (name, kind)


@pytest.mark.parametrize(
    "spec",
    [
        "postgresql://admin:s3cretPW@db.example:99x/shop",  # bad port
        "postgresql://admin:s3cretPW@db.example:5432/",  # no database
        "postgresql://admin:s3cretPW@db.example/shop,postgresql://admin:s3cretPW@db2/shop",
        "main=postgresql://admin:s3cretPW@db.example:bad/shop",  # named, bad port
        "bad!name=postgresql://admin:s3cretPW@db.example/shop",  # bad name
        "postgresql://admin:s3cretPW@[db.example/shop",  # unbalanced IPv6 bracket
    ],
)
def test_postgres_password_never_in_config_error(spec: str) -> None:
    message = load_error({"CLOUDBACKUP_SOURCES": spec})
    assert "s3cretPW" not in message


def test_postgres_password_not_in_repr() -> None:
    (source,) = load({"sources": ["postgresql://admin:s3cretPW@db.example/shop"]}).sources
    assert "s3cretPW" not in repr(source)
    assert "s3cretPW" not in source.redacted
    assert "s3cretPW" in source.secrets


def test_a_long_bad_value_is_cut_short_in_the_message() -> None:
    message = load_error({"CLOUDBACKUP_S3_BUCKET": "B" * 10_000})
    assert "CLOUDBACKUP_S3_BUCKET" in message and "(10000 characters)" in message
    assert len(message) < 300


def test_a_bad_source_names_the_variable_it_came_from() -> None:
    message = load_error({"CLOUDBACKUP_SOURCES": "/srv/www,x=cmd:"})
    assert "CLOUDBACKUP_SOURCES, environment" in message
    assert "command line" in load_error({}, {"sources": ["x=cmd:"]})


def test_largest_accepted_part_size_and_lock() -> None:
    settings = load(
        {}, {"CLOUDBACKUP_S3_PART_SIZE": "5GiB", "CLOUDBACKUP_S3_OBJECT_LOCK": "compliance:36500d"}
    )
    assert settings.s3_part_size == 5 * 1024**3
    assert settings.s3_object_lock == ObjectLock("COMPLIANCE", 36500)

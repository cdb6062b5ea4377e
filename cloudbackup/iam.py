"""Render the least-privilege IAM policy templates shipped with the package.

The templates are plain IAM JSON with three placeholders: ``${Bucket}``, ``${Prefix}`` and
``${KmsKeyArn}``. Statements whose ``Sid`` starts with ``Optional`` belong to an opt-in feature
(``OptionalObjectLock``, ``OptionalKms``, ``OptionalRequireConditionalWrites``): ``render`` keeps
them only when that feature is asked for, and drops them otherwise. ``infra/iam/`` holds the
canonical copies; ``cloudbackup/iam_templates/`` is a byte-identical copy shipped as package data
(a test keeps them equal), so ``cloudbackup iam render`` works from a plain wheel install.

Host scoping is a narrower key base: with ``host="web1"`` every ``${Prefix}`` becomes
``<prefix>/web1``, so object ARNs end in ``<prefix>/web1/*`` and the ``s3:prefix`` condition of
``s3:ListBucket`` allows ``<prefix>/web1/`` and ``<prefix>/web1/*`` only.
"""

from __future__ import annotations

import ipaddress
import json
import re
from importlib.resources import files
from typing import Any

from cloudbackup.core.errors import ConfigError

ROLES = ("writer", "pruner", "restorer")
BUCKET_POLICY = "bucket-policy"
TEMPLATES = (*ROLES, BUCKET_POLICY)

# Sid of an optional statement -> the render option that switches it on.
OPTIONAL_STATEMENTS = {
    "OptionalObjectLock": "object_lock",
    "OptionalKms": "kms_key_arn",
    "OptionalRequireConditionalWrites": "require_conditional_writes",
}

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_BUCKET_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
# Same character set as source and host names (model.NAME_RE); no IAM wildcards (* ?) and no
# "$" (policy variables), so a rendered value can never widen or break a policy.
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_KMS_KEY_ARN_RE = re.compile(r"arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+")
_PLACEHOLDER_RE = re.compile(r"\$\{([A-Za-z]+)\}(/?)")


def load_template(role: str) -> str:
    """The raw template text for ``role`` (one of ``TEMPLATES``), from the package data."""
    if role not in TEMPLATES:
        raise ConfigError(
            f"unknown IAM policy template {role!r}", hint=f"choose one of {', '.join(TEMPLATES)}"
        )
    return (files("cloudbackup") / "iam_templates" / f"{role}.json").read_text(encoding="utf-8")


def render(
    role: str,
    bucket: str,
    prefix: str,
    host: str | None = None,
    *,
    object_lock: bool = False,
    kms_key_arn: str | None = None,
) -> str:
    """The identity policy for ``role`` with bucket, prefix (and one host) filled in, as JSON.

    ``object_lock`` adds ``s3:PutObjectRetention`` (writer only: uploads carry Object Lock
    retention headers). ``kms_key_arn`` adds the KMS permissions SSE-KMS needs on that key
    (writer: ``kms:GenerateDataKey`` + ``kms:Decrypt``; pruner and restorer: ``kms:Decrypt``).
    A role without such a statement ignores the option. Raises ``ConfigError`` naming a bad value.
    """
    if role not in ROLES:
        raise ConfigError(f"unknown IAM role {role!r}", hint=f"choose one of {', '.join(ROLES)}")
    values = {"Bucket": validate_bucket(bucket), "Prefix": _key_base(prefix, host)}
    enabled: set[str] = set()
    if object_lock:
        enabled.add("object_lock")
    if kms_key_arn is not None:
        values["KmsKeyArn"] = validate_kms_key_arn(kms_key_arn)
        enabled.add("kms_key_arn")
    return _render(role, values, enabled)


def render_bucket_policy(
    bucket: str, prefix: str, *, require_conditional_writes: bool = False
) -> str:
    """The bucket policy: deny plain HTTP; optionally deny uploads without ``If-None-Match``."""
    values = {"Bucket": validate_bucket(bucket), "Prefix": _key_base(prefix, None)}
    enabled = {"require_conditional_writes"} if require_conditional_writes else set()
    return _render(BUCKET_POLICY, values, enabled)


def validate_bucket(bucket: str) -> str:
    """``bucket`` if it is a valid S3 (general purpose) bucket name, else ``ConfigError``."""
    bad = (
        not _BUCKET_RE.fullmatch(bucket)
        or ".." in bucket
        or bucket.startswith(_BUCKET_RESERVED_PREFIXES)
        or bucket.endswith(_BUCKET_RESERVED_SUFFIXES)
        or _is_ip_address(bucket)
    )
    if bad:
        raise ConfigError(
            f"invalid S3 bucket name {bucket!r}",
            hint="use 3-63 lowercase letters, digits, '.' and '-', starting and ending with a "
            "letter or digit (not an IP address, no '..')",
        )
    return bucket


def validate_prefix(prefix: str) -> str:
    """The normalized key prefix (surrounding ``/`` removed, as the configuration does)."""
    normalized = prefix.strip().strip("/")
    if normalized and not all(_is_name(part) for part in normalized.split("/")):
        raise ConfigError(
            f"invalid S3 prefix {prefix!r}",
            hint="use letters, digits, '.', '_' and '-', with '/' between parts",
        )
    return normalized


def validate_host(host: str) -> str:
    """``host`` if it is a valid host name for key paths, else ``ConfigError``."""
    if not _is_name(host):
        raise ConfigError(
            f"invalid host name {host!r}", hint="use letters, digits, '.', '_' or '-'"
        )
    return host


def validate_kms_key_arn(arn: str) -> str:
    """``arn`` if it is a KMS key ARN (IAM authorizes KMS by key ARN, not alias or bare id)."""
    if not _KMS_KEY_ARN_RE.fullmatch(arn):
        raise ConfigError(
            f"invalid KMS key ARN {arn!r}",
            hint="give the key's full ARN (arn:aws:kms:REGION:ACCOUNT:key/KEY-ID), "
            "not an alias or a bare key id",
        )
    return arn


def _is_name(text: str) -> bool:
    return bool(_NAME_RE.fullmatch(text)) and text not in {".", ".."}


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _key_base(prefix: str, host: str | None) -> str:
    """The key prefix a policy is scoped to: ``prefix``, or ``prefix/host`` for one host."""
    parts = [validate_prefix(prefix)]
    if host is not None:
        parts.append(validate_host(host))
    return "/".join(part for part in parts if part)


def _render(name: str, values: dict[str, str], enabled: set[str]) -> str:
    policy = json.loads(load_template(name))
    statements = []
    for statement in policy["Statement"]:
        sid = statement.get("Sid", "")
        if sid.startswith("Optional"):
            if sid not in OPTIONAL_STATEMENTS:
                raise RuntimeError(f"template {name}.json: unknown optional statement {sid!r}")
            if OPTIONAL_STATEMENTS[sid] not in enabled:
                continue
        statements.append(_substitute(statement, values, name))
    if not values["Prefix"]:
        # An empty key base means the whole bucket: no s3:prefix condition to narrow listing.
        for statement in statements:
            _drop_prefix_condition(statement)
    policy["Statement"] = statements
    return json.dumps(policy, indent=2)


def _substitute(node: Any, values: dict[str, str], name: str) -> Any:
    if isinstance(node, dict):
        return {key: _substitute(value, values, name) for key, value in node.items()}
    if isinstance(node, list):
        return [_substitute(value, values, name) for value in node]
    if isinstance(node, str):

        def replace(match: re.Match[str]) -> str:
            placeholder, slash = match[1], match[2]
            if placeholder not in values:
                raise RuntimeError(f"template {name}.json: no value for ${{{placeholder}}}")
            value = values[placeholder]
            # "${Prefix}/x" with an empty prefix is "x", not "/x".
            return value + slash if value else ""

        return _PLACEHOLDER_RE.sub(replace, node)
    return node


def _drop_prefix_condition(statement: dict[str, Any]) -> None:
    condition = statement.get("Condition", {})
    for operator in list(condition):
        condition[operator].pop("s3:prefix", None)
        if not condition[operator]:
            del condition[operator]
    if "Condition" in statement and not condition:
        del statement["Condition"]

"""IAM policy templates: shipped copies, rendering, scoping, and the CloudFormation twin."""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudbackup import iam
from cloudbackup.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
INFRA_IAM = ROOT / "infra" / "iam"
PACKAGE_IAM = ROOT / "cloudbackup" / "iam_templates"
CFN_TEMPLATE = ROOT / "infra" / "cloudformation" / "backup-bucket.yaml"
BUCKET = "example-backups"
KMS = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def statements(policy_text: str) -> list[dict[str, Any]]:
    return list(json.loads(policy_text)["Statement"])


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def by_sid(policy_text: str) -> dict[str, dict[str, Any]]:
    return {s["Sid"]: s for s in statements(policy_text)}


def allowed_actions(policy_text: str) -> list[str]:
    return [
        a for s in statements(policy_text) if s["Effect"] == "Allow" for a in as_list(s["Action"])
    ]


def grants(policy_text: str, action: str) -> bool:
    """Whether some Allow statement names ``action`` (wildcards in the policy honoured)."""
    return any(fnmatchcase(action.lower(), a.lower()) for a in allowed_actions(policy_text))


# --- shipped copies -------------------------------------------------------------------------


def test_package_copies_are_byte_identical_to_infra() -> None:
    infra = sorted(p.name for p in INFRA_IAM.glob("*.json"))
    package = sorted(p.name for p in PACKAGE_IAM.glob("*.json"))
    assert infra == package == sorted(f"{name}.json" for name in iam.TEMPLATES)
    for name in infra:
        assert (INFRA_IAM / name).read_bytes() == (PACKAGE_IAM / name).read_bytes(), (
            f"cloudbackup/iam_templates/{name} differs from infra/iam/{name}: "
            f"cp infra/iam/{name} cloudbackup/iam_templates/"
        )


@pytest.mark.parametrize("name", iam.TEMPLATES)
def test_load_template_reads_package_data(name: str) -> None:
    assert iam.load_template(name) == (INFRA_IAM / f"{name}.json").read_text(encoding="utf-8")


def test_optional_statements_are_all_known() -> None:
    for name in iam.TEMPLATES:
        for statement in statements(iam.load_template(name)):
            sid = statement["Sid"]
            assert sid.isalnum(), sid  # IAM Sids are alphanumeric
            if sid.startswith("Optional"):
                assert sid in iam.OPTIONAL_STATEMENTS


# --- rendering ------------------------------------------------------------------------------


@pytest.mark.parametrize("role", iam.ROLES)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"host": "web1"},
        {"object_lock": True, "kms_key_arn": KMS},
        {"host": "h", "kms_key_arn": KMS},
    ],
)
def test_every_role_renders_to_json_without_placeholders(
    role: str, options: dict[str, Any]
) -> None:
    text = iam.render(role, BUCKET, "cloudbackup", **options)
    assert "${" not in text
    policy = json.loads(text)
    assert policy["Version"] == "2012-10-17"
    sids = [s["Sid"] for s in policy["Statement"]]
    assert len(sids) == len(set(sids))
    for statement in policy["Statement"]:
        for resource in as_list(statement["Resource"]):
            assert resource.startswith((f"arn:aws:s3:::{BUCKET}", "arn:aws:kms:")), resource


def test_bucket_policy_renders() -> None:
    plain = by_sid(iam.render_bucket_policy(BUCKET, "cloudbackup"))
    assert list(plain) == ["DenyInsecureTransport"]
    deny = plain["DenyInsecureTransport"]
    assert deny["Effect"] == "Deny" and deny["Principal"] == "*"
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    strict = by_sid(iam.render_bucket_policy(BUCKET, "cb", require_conditional_writes=True))
    conditional = strict["OptionalRequireConditionalWrites"]
    assert conditional["Resource"] == f"arn:aws:s3:::{BUCKET}/cb/*"
    assert conditional["Condition"]["Null"] == {"s3:if-none-match": "true"}
    # Exempts CreateMultipartUpload/UploadPart, which cannot carry If-None-Match.
    assert conditional["Condition"]["Bool"] == {"s3:ObjectCreationOperation": "true"}


def test_render_returns_pretty_json() -> None:
    text = iam.render("writer", BUCKET, "cloudbackup")
    assert text.startswith('{\n  "Version"')
    assert json.dumps(json.loads(text), indent=2) == text


@pytest.mark.parametrize("role", iam.ROLES)
def test_prefix_scoping(role: str) -> None:
    policy = by_sid(iam.render(role, BUCKET, "backups/prod"))
    listing = policy["ListBackupKeys"]
    assert listing["Resource"] == f"arn:aws:s3:::{BUCKET}"
    assert listing["Condition"] == {
        "StringLike": {"s3:prefix": ["backups/prod/", "backups/prod/*"]}
    }
    object_arns = [
        r
        for s in policy.values()
        if s["Effect"] == "Allow"
        for r in as_list(s["Resource"])
        if r.startswith(f"arn:aws:s3:::{BUCKET}/")
    ]
    assert object_arns and set(object_arns) == {f"arn:aws:s3:::{BUCKET}/backups/prod/*"}


@pytest.mark.parametrize("role", iam.ROLES)
def test_host_scoping_narrows_resources(role: str) -> None:
    wide = statements(iam.render(role, BUCKET, "cloudbackup"))
    narrow = statements(iam.render(role, BUCKET, "cloudbackup", host="web1"))
    assert [s["Sid"] for s in wide] == [s["Sid"] for s in narrow]
    for before, after in zip(wide, narrow, strict=True):
        if before["Effect"] == "Deny":
            assert before == after  # denies stay bucket-wide
            continue
        for old, new in zip(as_list(before["Resource"]), as_list(after["Resource"]), strict=True):
            if old == f"arn:aws:s3:::{BUCKET}/cloudbackup/*":
                assert new == f"arn:aws:s3:::{BUCKET}/cloudbackup/web1/*"
            else:
                assert old == new == f"arn:aws:s3:::{BUCKET}"
    listing = by_sid(iam.render(role, BUCKET, "cloudbackup", host="web1"))["ListBackupKeys"]
    assert listing["Condition"]["StringLike"]["s3:prefix"] == [
        "cloudbackup/web1/",
        "cloudbackup/web1/*",
    ]


def test_empty_prefix_means_the_whole_bucket() -> None:
    policy = by_sid(iam.render("restorer", BUCKET, ""))
    assert "Condition" not in policy["ListBackupKeys"]
    assert policy["ReadBackups"]["Resource"] == f"arn:aws:s3:::{BUCKET}/*"
    hosted = by_sid(iam.render("writer", BUCKET, "", host="web1"))
    assert hosted["WriteAndVerifyBackups"]["Resource"] == f"arn:aws:s3:::{BUCKET}/web1/*"
    assert hosted["ListBackupKeys"]["Condition"]["StringLike"]["s3:prefix"] == ["web1/", "web1/*"]


def test_prefix_is_normalized_like_the_configuration() -> None:
    assert iam.render("writer", BUCKET, "/cloudbackup/") == iam.render(
        "writer", BUCKET, "cloudbackup"
    )


def test_optional_statements_only_on_request() -> None:
    plain = iam.render("writer", BUCKET, "cloudbackup")
    assert not any(s["Sid"].startswith("Optional") for s in statements(plain))
    assert not grants(plain, "s3:PutObjectRetention") and not grants(plain, "kms:Decrypt")

    locked = by_sid(iam.render("writer", BUCKET, "cloudbackup", object_lock=True))
    assert locked["OptionalObjectLock"]["Action"] == "s3:PutObjectRetention"
    assert locked["OptionalObjectLock"]["Resource"] == f"arn:aws:s3:::{BUCKET}/cloudbackup/*"

    kms = by_sid(iam.render("writer", BUCKET, "cloudbackup", kms_key_arn=KMS))["OptionalKms"]
    assert kms["Resource"] == KMS
    assert set(kms["Action"]) == {"kms:GenerateDataKey", "kms:Decrypt"}  # multipart needs Decrypt
    for role in ("pruner", "restorer"):
        text = iam.render(role, BUCKET, "cloudbackup", object_lock=True, kms_key_arn=KMS)
        assert by_sid(text)["OptionalKms"]["Action"] == "kms:Decrypt"
        assert not grants(text, "s3:PutObjectRetention")


# --- what each role may do ------------------------------------------------------------------

DELETES = ("s3:DeleteObject", "s3:DeleteObjectVersion", "s3:DeleteBucket", "s3:DeleteBucketPolicy")
WRITES = ("s3:PutObject", "s3:PutObjectTagging", "s3:PutObjectRetention", "s3:PutBucketPolicy")


def test_writer_grants_what_uploads_need() -> None:
    text = iam.render("writer", BUCKET, "cloudbackup")
    for action in (
        "s3:PutObject",
        "s3:PutObjectTagging",
        "s3:GetObject",
        "s3:GetObjectTagging",
        "s3:ListBucket",
        "s3:ListBucketMultipartUploads",
        "s3:ListMultipartUploadParts",
        "s3:AbortMultipartUpload",
    ):
        assert grants(text, action), action


def test_writer_has_no_allow_for_delete() -> None:
    text = iam.render("writer", BUCKET, "cloudbackup", object_lock=True, kms_key_arn=KMS)
    assert not any("delete" in action.lower() for action in allowed_actions(text))
    for action in (*DELETES, "s3:BypassGovernanceRetention", "s3:PutLifecycleConfiguration"):
        assert not grants(text, action), action


def test_writer_denies_deletes_and_bucket_changes() -> None:
    policy = by_sid(iam.render("writer", BUCKET, "cloudbackup", host="web1"))
    deny = policy["DenyDeletingBackups"]
    assert deny["Effect"] == "Deny"
    assert deny["Resource"] == f"arn:aws:s3:::{BUCKET}/*"  # the whole bucket, not just its host
    assert {"s3:DeleteObject", "s3:DeleteObjectVersion", "s3:BypassGovernanceRetention"} <= set(
        deny["Action"]
    )
    config = policy["DenyBucketConfigurationChanges"]
    assert config["Effect"] == "Deny" and config["Resource"] == f"arn:aws:s3:::{BUCKET}"
    for action in (
        "s3:PutBucketPolicy",
        "s3:PutBucketVersioning",
        "s3:PutBucketObjectLockConfiguration",
        "s3:DeleteBucket",
        "s3:DeleteBucketPolicy",
        "s3:PutLifecycleConfiguration",
        "s3:PutEncryptionConfiguration",
    ):
        assert any(fnmatchcase(action, pattern) for pattern in config["Action"]), action


def test_pruner_deletes_but_never_writes_or_destroys_versions() -> None:
    text = iam.render("pruner", BUCKET, "cloudbackup", kms_key_arn=KMS)
    for action in (
        "s3:ListBucket",
        "s3:GetObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
        "s3:ListBucketMultipartUploads",
    ):
        assert grants(text, action), action
    for action in (*WRITES, "s3:DeleteObjectVersion", "s3:BypassGovernanceRetention"):
        assert not grants(text, action), action
    deny = by_sid(text)["DenyPermanentDeletes"]
    assert {"s3:DeleteObjectVersion", "s3:BypassGovernanceRetention"} <= set(deny["Action"])


def test_restorer_is_read_only() -> None:
    text = iam.render("restorer", BUCKET, "cloudbackup", object_lock=True, kms_key_arn=KMS)
    for action in ("s3:ListBucket", "s3:GetObject", "s3:GetObjectTagging", "s3:RestoreObject"):
        assert grants(text, action), action
    for action in (*WRITES, *DELETES, "s3:AbortMultipartUpload", "kms:GenerateDataKey"):
        assert not grants(text, action), action


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bucket",
    [
        "",
        "ab",
        "Backups",
        "my_bucket",
        "-backups",
        "backups-",
        "my..bucket",
        "192.168.1.10",
        "xn--backups",
        "backups-s3alias",
        "a" * 64,
        "bucket/x",
        "buck*et",
        "b${x}b",
    ],
)
def test_bad_bucket_is_a_config_error_naming_it(bucket: str) -> None:
    with pytest.raises(ConfigError) as info:
        iam.render("writer", bucket, "cloudbackup")
    assert repr(bucket) in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    "prefix", ["back*ups", "a//b", "a/../b", "a/./b", "${Prefix}", "with space", "a?", "ünï"]
)
def test_bad_prefix_is_a_config_error_naming_it(prefix: str) -> None:
    with pytest.raises(ConfigError) as info:
        iam.render("pruner", BUCKET, prefix)
    assert repr(prefix) in str(info.value)


@pytest.mark.parametrize("host", ["", "a/b", "*", "..", "web 1", "web1\n"])
def test_bad_host_is_a_config_error_naming_it(host: str) -> None:
    with pytest.raises(ConfigError) as info:
        iam.render("writer", BUCKET, "cloudbackup", host=host)
    assert repr(host) in str(info.value)


@pytest.mark.parametrize(
    "arn",
    [
        "",
        "alias/backups",
        "1234abcd-12ab",
        "arn:aws:kms:eu-west-1:123456789012:alias/x",
        "arn:aws:kms:eu-west-1:123:key/x",
        "arn:aws:kms:eu-west-1:123456789012:key/*",
    ],
)
def test_bad_kms_key_arn_is_a_config_error(arn: str) -> None:
    with pytest.raises(ConfigError) as info:
        iam.render("writer", BUCKET, "cloudbackup", kms_key_arn=arn)
    assert repr(arn) in str(info.value)


@pytest.mark.parametrize("role", ["admin", "bucket-policy", "Writer"])
def test_unknown_role_is_a_config_error(role: str) -> None:
    with pytest.raises(ConfigError, match="writer, pruner, restorer"):
        iam.render(role, BUCKET, "cloudbackup")


def test_unknown_template_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        iam.load_template("../pyproject")


# --- the CloudFormation template carries the same statements --------------------------------


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (!Sub, !If, !Ref...) as their long forms."""


def _cfn_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _cfn_tag)


def _cfn_to_template(node: Any) -> Any:
    """A CloudFormation policy fragment in template form, every optional statement kept."""
    if isinstance(node, list):
        items = [_cfn_to_template(item) for item in node]
        return [item for item in items if item is not None]
    if isinstance(node, dict):
        if set(node) == {"Fn::Sub"}:
            return node["Fn::Sub"].replace("arn:${AWS::Partition}:", "arn:aws:")
        if set(node) == {"Ref"}:
            return None if node["Ref"] == "AWS::NoValue" else "${" + node["Ref"] + "}"
        if set(node) == {"Fn::If"}:
            return _cfn_to_template(node["Fn::If"][1])
        return {key: _cfn_to_template(value) for key, value in node.items()}
    return node


@pytest.fixture(scope="module")
def cfn() -> dict[str, Any]:
    return dict(yaml.load(CFN_TEMPLATE.read_text(encoding="utf-8"), Loader=_CfnLoader))


@pytest.mark.parametrize(
    ("resource", "template"),
    [
        ("WriterPolicy", "writer"),
        ("PrunerPolicy", "pruner"),
        ("RestorerPolicy", "restorer"),
        ("BucketPolicy", "bucket-policy"),
    ],
)
def test_cloudformation_policies_match_templates(
    cfn: dict[str, Any], resource: str, template: str
) -> None:
    document = cfn["Resources"][resource]["Properties"]["PolicyDocument"]
    assert _cfn_to_template(document) == json.loads(iam.load_template(template))


def test_cloudformation_bucket_basics(cfn: dict[str, Any]) -> None:
    bucket = cfn["Resources"]["Bucket"]
    assert bucket["DeletionPolicy"] == bucket["UpdateReplacePolicy"] == "Retain"
    props = bucket["Properties"]
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    assert all(props["PublicAccessBlockConfiguration"].values())
    rules = {r["Id"]: r for r in _cfn_to_template(props["LifecycleConfiguration"]["Rules"])}
    assert (
        "DaysAfterInitiation"
        in rules["abort-incomplete-multipart-uploads"]["AbortIncompleteMultipartUpload"]
    )
    assert "NoncurrentDays" in rules["expire-noncurrent-versions"]["NoncurrentVersionExpiration"]
    # Only archives move to colder classes; manifests (kind=manifest) always stay STANDARD.
    transition = rules["transition-archives"]
    assert transition["TagFilters"] == [{"Key": "cloudbackup:kind", "Value": "archive"}]
    assert "Expiration" not in transition
    allowed = cfn["Parameters"]["ArchiveTransitionStorageClass"]["AllowedValues"]
    assert set(allowed) <= {
        "NONE",
        "STANDARD_IA",
        "ONEZONE_IA",
        "INTELLIGENT_TIERING",
        "GLACIER_IR",
    }

"""Helpers for IAM enforcement tests against moto's in-process mock (reusable by CLI tests).

Pattern (moto checks identity policies only for requests made after the setup phase):

    @pytest.fixture
    def world(monkeypatch):
        fake_admin_env(monkeypatch)
        with mock_aws():
            admin_s3 = boto3.client("s3", region_name=REGION)
            admin_s3.create_bucket(Bucket=BUCKET)
            iam_client = boto3.client("iam", region_name=REGION)
            writer = create_role_user(iam_client, "writer", BUCKET, "cloudbackup", host="a")
            yield writer          # set up unauthenticated: moto does not enforce IAM yet

    @enforce_iam                  # from here on every request is checked against IAM
    def test_x(world):
        s3 = s3_client(world)     # or run the CLI with env=world.env()
        ...

Setup belongs in fixtures: ``enforce_iam`` (moto's ``set_initial_no_auth_action_count(0)``)
switches enforcement on when the test function itself starts, after its fixtures ran, and the
default test credentials are no IAM user, so they are refused from then on.

What moto checks: the action and the resource ARN of identity policies (inline and attached).
What it does not: ``Condition`` blocks (it only evaluates ``StringEquals`` on trust policies;
``s3:prefix``, ``s3:if-none-match``, ``kms:ViaService``... are ignored), bucket policies' effect on
users (never load ``infra/iam/bucket-policy.json`` into moto: its ``Principal: "*"`` Deny would
apply to every request there). HeadBucket needs an ``s3:HeadBucket`` action that does not exist
in AWS: probe a bucket with ``list_objects_v2(MaxKeys=1, Prefix=...)`` instead, never add fake
actions to the policies. DeleteObjects (multi-delete) is authorized against the bucket ARN in
moto, so an object-scoped ``s3:DeleteObject`` grant sees every key refused there; AWS checks
each key. PutObjectRetention, UploadPart and CompleteMultipartUpload all map to ``PutObject``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from moto.core import set_initial_no_auth_action_count

from cloudbackup import iam

REGION = "us-east-1"

# Decorator: IAM enforced for every request the decorated test makes (fixtures ran before).
enforce_iam = set_initial_no_auth_action_count(0)


@dataclass(frozen=True)
class Credentials:
    """Access keys of an IAM user created in moto."""

    user_name: str
    access_key_id: str
    secret_access_key: str

    def client_kwargs(self) -> dict[str, str]:
        return {
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
        }

    def env(self) -> dict[str, str]:
        """Environment for a subprocess or ``CliRunner`` using these credentials."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": REGION,
        }


def fake_admin_env(monkeypatch: Any) -> None:
    """Dummy default credentials for the setup phase; never real ones."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)


def create_user_with_policy(iam_client: Any, user_name: str, policy_document: str) -> Credentials:
    """An IAM user holding ``policy_document`` as an attached managed policy, and its keys.

    Managed, like the CloudFormation policies (inline user policies are limited to 2 KiB on AWS).
    Call it before enforcement starts (in a fixture).
    """
    iam_client.create_user(UserName=user_name)
    policy = iam_client.create_policy(
        PolicyName=f"{user_name}-policy", PolicyDocument=policy_document
    )
    iam_client.attach_user_policy(UserName=user_name, PolicyArn=policy["Policy"]["Arn"])
    key = iam_client.create_access_key(UserName=user_name)["AccessKey"]
    return Credentials(user_name, key["AccessKeyId"], key["SecretAccessKey"])


def create_role_user(
    iam_client: Any,
    role: str,
    bucket: str,
    prefix: str,
    host: str | None = None,
    *,
    user_name: str | None = None,
    **options: Any,
) -> Credentials:
    """A user holding ``cloudbackup.iam.render(role, bucket, prefix, host, **options)``."""
    if user_name is None:
        scope = "-".join(part for part in (prefix.replace("/", "-"), host) if part)
        user_name = f"cloudbackup-{role}-{scope}" if scope else f"cloudbackup-{role}"
    document = iam.render(role, bucket, prefix, host, **options)
    return create_user_with_policy(iam_client, user_name, document)


def s3_client(
    credentials: Credentials, *, region: str = REGION, endpoint_url: str | None = None
) -> Any:
    """A boto3 S3 client signing with ``credentials``; one attempt per call."""
    return boto3.client(
        "s3",
        region_name=region,
        endpoint_url=endpoint_url,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
        **credentials.client_kwargs(),
    )


def error_code(exc: BaseException) -> str:
    """The S3 error code of a ``ClientError`` (``AccessDenied``, ``NoSuchKey``...)."""
    assert isinstance(exc, ClientError), exc
    return str(exc.response.get("Error", {}).get("Code", ""))

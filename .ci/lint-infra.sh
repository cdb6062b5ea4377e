#!/usr/bin/env bash
# Lint the infrastructure files: every IAM template rendered (plain, host-scoped, every optional
# statement on, empty prefix) and checked with parliament; the CloudFormation template with
# cfn-lint. Exits non-zero on any finding that is not accepted below.
#
# Usage: .ci/lint-infra.sh [BIN_DIR]   (BIN_DIR: a venv's bin directory; default: `python` on PATH)
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ $# -ge 1 && -n "$1" ]]; then
    PY="$1/python"
else
    PY=python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

status=0

echo "== parliament (rendered IAM policies)"
"$PY" - <<'PYEOF' || status=1
import json
import subprocess
import sys

from cloudbackup import iam

# Findings accepted on purpose: (template variant prefix, parliament issue code) -> why.
# Keep this in step with docs/least-privilege.md ("Linter findings").
ACCEPTED: dict[tuple[str, str], str] = {}

BUCKET = "example-backups"
KMS = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
variants = {}
for role in iam.ROLES:
    variants[f"{role}"] = iam.render(role, BUCKET, "cloudbackup")
    variants[f"{role}-host"] = iam.render(role, BUCKET, "cloudbackup", host="web1")
    variants[f"{role}-all-options"] = iam.render(
        role, BUCKET, "backups/prod", host="web1", object_lock=True, kms_key_arn=KMS
    )
    variants[f"{role}-empty-prefix"] = iam.render(role, BUCKET, "")
variants["bucket-policy"] = iam.render_bucket_policy(BUCKET, "cloudbackup")
variants["bucket-policy-conditional-writes"] = iam.render_bucket_policy(
    BUCKET, "cloudbackup", require_conditional_writes=True
)

failed = False
for name, policy in variants.items():
    assert "${" not in policy, f"{name}: placeholder left in rendered policy"
    proc = subprocess.run(
        [sys.executable, "-m", "parliament.cli", "--json", "--include-community-auditors",
         "--minimum_severity", "INFO"],
        input=policy, capture_output=True, text=True, check=False,
    )
    findings = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and not findings):
        print(f"FAIL {name}: parliament exited {proc.returncode}: {proc.stderr.strip()}")
        failed = True
        continue
    bad = []
    for finding in findings:
        reason = next(
            (why for (variant, issue), why in ACCEPTED.items()
             if name.startswith(variant) and finding["issue"] == issue),
            None,
        )
        if reason:
            print(f"accepted {name}: {finding['issue']} ({reason})")
        else:
            bad.append(finding)
    for finding in bad:
        print(f"FAIL {name}: {finding['issue']} {finding['title']} {finding.get('detail')}")
    failed = failed or bool(bad)
    if not bad:
        print(f"ok   {name}")
sys.exit(1 if failed else 0)
PYEOF

echo "== cfn-lint (infra/cloudformation)"
if "$PY" -c 'import sys; from cfnlint.runner import main; sys.argv[0] = "cfn-lint"; main()' \
    --include-checks I -- infra/cloudformation/*.yaml; then
    echo "ok   infra/cloudformation"
else
    status=1
fi

exit "$status"

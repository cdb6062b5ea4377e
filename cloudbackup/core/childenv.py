"""The environment of every child process (``pg_dump``, ``psql``, ``pg_restore``, ``cmd:``
sources, version probes, hooks): this process's environment without its secrets.

Pure: the CLI reads ``os.environ`` once and passes it to :func:`scrub` (``Settings.child_env``);
whoever starts a child calls :func:`build` on that base with the variables the tool itself
hands the child (a passfile it made, a hook's ``CLOUDBACKUP_RESULT``...). A child never
inherits ``os.environ`` as it is.

What is removed, and why:

* every ``CLOUDBACKUP_*`` variable (and its ``_FILE`` form): ``CLOUDBACKUP_SOURCES`` holds
  database passwords, and nothing of the tool's configuration is any child's business;
* AWS credentials and what points at them: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, ``AWS_SECURITY_TOKEN``, their ``*_FILE`` forms, any other ``AWS_*``
  name holding ``SECRET``, ``TOKEN``, ``PASSWORD``, ``CREDENTIAL`` or ``ACCESS_KEY`` (the shared
  credentials file, web-identity token file, container credential endpoints), and
  ``AWS_CONFIG_FILE`` (a config file may hold keys or a ``credential_process``). Region,
  profile name and CA bundle stay: they are not secrets;
* libpq's password variables: ``PGPASSWORD``, ``PGPASSFILE`` and ``PGSERVICEFILE`` (a service
  file may hold ``password=``). The only passfile a child sees is the one the tool made for
  it, given in ``extra``; without one, libpq still reads the user's own ``~/.pgpass``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["NO_ENV", "build", "is_secret", "scrub"]

#: An empty environment: the default of anything that starts a child without being told
#: what to give it (nothing leaks by omission).
NO_ENV: Mapping[str, str] = MappingProxyType({})

_AWS_SECRETS = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ACCESS_KEY",  # the older names some tools still read
        "AWS_SECRET_KEY",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    }
)
_AWS_SECRET_WORDS = re.compile(r"SECRET|TOKEN|PASSWORD|CREDENTIAL|ACCESS_KEY")
_PG_SECRETS = frozenset({"PGPASSWORD", "PGPASSFILE", "PGSERVICEFILE"})


def is_secret(name: str) -> bool:
    """True for a variable no child may inherit (see the module docstring)."""
    upper = name.upper()
    if upper.startswith("CLOUDBACKUP_"):
        return True
    if upper.startswith("AWS_"):
        base = upper.removesuffix("_FILE")
        return (
            upper in _AWS_SECRETS or base in _AWS_SECRETS or bool(_AWS_SECRET_WORDS.search(upper))
        )
    return upper in _PG_SECRETS


def scrub(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the variables :func:`is_secret` names."""
    return {name: value for name, value in environ.items() if not is_secret(name)}


def build(base: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of one child: ``base`` scrubbed, then ``extra`` on top.

    ``extra`` is what the tool itself hands this child (a passfile it made, ``LC_MESSAGES``,
    a hook's ``CLOUDBACKUP_RESULT``): it is added as given, even under a scrubbed name.
    """
    env = scrub(base)
    env.update(extra or {})
    return env

"""Extended attributes: the namespaces this process reads and restores, and the errors that
mean a filesystem keeps none. The writer and the extractor share them, so what is archived
as root is what is restored as root."""

from __future__ import annotations

import errno
import os

#: A filesystem (or a file on it) that keeps no extended attributes: not a warning.
UNSUPPORTED = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})


def namespaces() -> tuple[str, ...]:
    """``user.*`` always; ``security.*`` and ``trusted.*`` when running as root (only root
    may read and set them, as with GNU tar ``--xattrs``). System attributes (POSIX ACLs)
    are not kept."""
    return ("user.", "security.", "trusted.") if os.geteuid() == 0 else ("user.",)

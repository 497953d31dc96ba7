"""Process limits a socket-heavy process needs (services, the load generator)."""

from __future__ import annotations

import resource


def raise_open_file_limit(want: int) -> int:
    """Lift the soft open-file limit (often 1024) to ``want``, capped at the hard limit.

    Every socket is a descriptor. Returns the soft limit in force afterwards;
    a limit already at or above ``want`` is left alone.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return want if soft == resource.RLIM_INFINITY else soft
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new

"""Whether a host is this machine's loopback: what ermgap binds by default, and what it warns about leaving.

A module of its own, without Ray: `ermgap ui`, `ermgap serve` and `ermgap submit` check hosts too, and every
`ermgap` command imports them through the CLI.
"""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback IPs (what ermgap binds by default); anything else is exposed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

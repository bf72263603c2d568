"""Where a shard server listens on a cluster node, and the address it reports (DESIGN §1, §7).

A shard on a multi-node cluster must listen where workers, the driver, `ultramem serve` and
other shards can reach it, and report that address; on the embedded single-machine Ray it stays
on loopback. `resolve_bind` turns the operator's choice into (host to bind, host to report):

- "node": the node's address as Ray knows it (the `--host` its `ultramem cluster up` was given);
- an interface name ("eth1"): that interface's IPv4 address on this node (found with psutil);
- an IP address: bound as given; "0.0.0.0" / "::" (every interface) only when named, and then
  the node's address is reported, since no peer can dial a wildcard.
"""

from __future__ import annotations

import ipaddress
import socket

from param_server.errors import ConfigError

WILDCARDS = ("0.0.0.0", "::")


def interface_address(name: str) -> str:
    """The first IPv4 (else IPv6) address of network interface `name` on this machine."""
    import psutil

    addrs = psutil.net_if_addrs()
    if name not in addrs:
        raise ConfigError(f"no network interface {name!r} on {socket.gethostname()} "
                          f"(interfaces: {', '.join(sorted(addrs))})")
    for family in (socket.AF_INET, socket.AF_INET6):
        for a in addrs[name]:
            if a.family == family:
                return a.address.split("%")[0]
    raise ConfigError(f"network interface {name!r} on {socket.gethostname()} has no IP address")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def resolve_bind(bind: str, node_ip: str) -> tuple[str, str]:
    """(host to bind, host to report) for `bind` ("node", an interface name or an IP) on a node
    whose address (as Ray knows it) is `node_ip`."""
    if bind == "node":
        return node_ip, node_ip
    host = bind if _is_ip(bind) else interface_address(bind)
    return host, node_ip if host in WILDCARDS else host

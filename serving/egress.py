"""Egress: which addresses the service itself may connect to (today: webhook targets).

A tenant chooses a webhook's URL, so unchecked the service could be made to POST into the
operator's own network: cloud metadata at 169.254.169.254, admin ports on loopback, private
services. `AddressPolicy` allows an address only if it is globally routable unicast, or
inside a network the operator trusts (`webhooks.allowed_networks`). An IPv6 address that
carries an IPv4 one (mapped, compatible, NAT64, 6to4) is judged by the IPv4 address it reaches.

Odd spellings of an address (`2130706433`, `0x7f.1`, `127.1`, `0`) are read by the system's
own parser (`getaddrinfo` with AI_NUMERICHOST: no DNS), the one `connect` would use, so no
spelling means one thing to the check and another to the socket. Host names are judged by
what they resolve to when the service connects: `GuardedResolver` is the aiohttp resolver
that resolves a name once, drops forbidden addresses and hands aiohttp only the allowed
ones, so the address checked is the address connected to (DNS rebinding cannot slip
another in between).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Iterable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Named first so a refusal says what the address is; the stdlib's is_global catches the rest
# (documentation, benchmarking, IETF protocol ranges, ...).
_KINDS: list[tuple[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]]] = [
    (kind, [ipaddress.ip_network(n) for n in networks]) for kind, networks in [
        ("unspecified", ["0.0.0.0/8", "::/128"]),
        ("loopback", ["127.0.0.0/8", "::1/128"]),
        ("link-local", ["169.254.0.0/16", "fe80::/10"]),
        ("private", ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]),
        ("shared (carrier-grade NAT)", ["100.64.0.0/10"]),
        ("unique-local", ["fc00::/7"]),
        ("site-local", ["fec0::/10"]),
        ("multicast", ["224.0.0.0/4", "ff00::/8"]),
        ("broadcast", ["255.255.255.255/32"]),
    ]
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class ForbiddenAddress(Exception):
    """The service will not connect there; the message says what the address is."""


def reached_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address delivers to (mapped, compatible, NAT64, 6to4), if any."""
    if address.version == 4:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    return None


def kind_of(address: IPAddress) -> str | None:
    """What keeps `address` off limits ('loopback', 'private', ...), or None if it is public unicast."""
    for kind, networks in _KINDS:
        if any(address in network for network in networks):
            return kind
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "not globally routable"
    return None


class AddressPolicy:
    """Public unicast addresses, plus the networks the operator trusts."""

    def __init__(self, allowed_networks: Iterable[str] = ()):
        self.allowed_networks = [ipaddress.ip_network(network) for network in allowed_networks]

    def trusts(self, address: IPAddress) -> bool:
        """Whether `address` (or the IPv4 address it reaches) is in a network the operator trusts."""
        target = reached_ipv4(address) or address
        return any(a in network for a in (address, target) for network in self.allowed_networks)

    def refusal(self, address: IPAddress) -> str | None:
        """None if the service may connect to `address`; otherwise why not, for a person."""
        target = reached_ipv4(address) or address
        if self.trusts(address):
            return None
        kind = kind_of(target)
        if kind is None:
            return None
        return f"{address} is {kind}" + (f" (it reaches {target})" if target != address else "")


def literal_address(host: str) -> IPAddress | None:
    """The address `host` spells, or None for a name. IPv4 in any form the system's parser
    accepts (`2130706433`, `0177.0.0.1`, `0x7f.1`, `127.1`, `0`), the form `connect` would see;
    IPv6 as written (`::ffff:127.0.0.1`, `fe80::1%eth0`), whose syntax has no such variants."""
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            return None
    try:
        infos = socket.getaddrinfo(host.removesuffix("."), None, socket.AF_INET, socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST)  # numeric only: never a DNS query
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    return ipaddress.IPv4Address(infos[0][4][0])


def is_loopback_name(host: str) -> bool:
    """`localhost` and `*.localhost` mean loopback by definition (RFC 6761), whatever DNS says."""
    name = host.lower().removesuffix(".")
    return name == "localhost" or name.endswith(".localhost")


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that answers only with addresses the policy allows. aiohttp
    connects to exactly what a resolver returns, so checking here pins the connection to the
    checked addresses; the TLS server name and Host header keep the name."""

    def __init__(self, policy: AddressPolicy, dns: AbstractResolver | None = None):
        self.policy = policy
        self.dns = dns or ThreadedResolver()  # getaddrinfo: the system's view, /etc/hosts included

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        answers = await self.dns.resolve(host, port, family)
        allowed, refusals = [], []
        for answer in answers:
            reason = self.policy.refusal(ipaddress.ip_address(answer["host"]))
            if reason is None:
                allowed.append(answer)
            else:
                refusals.append(reason)
        if not allowed:
            raise ForbiddenAddress(f"{host} resolves only to addresses this server does not call: "
                                   f"{'; '.join(dict.fromkeys(refusals)) or 'none'}")
        return allowed

    async def close(self) -> None:
        await self.dns.close()

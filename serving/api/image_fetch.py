"""Fetching an `input_reference` given as an http(s) `image_url`, when the operator allows it.

The client chooses the URL, so this is the webhooks' problem again (serving/egress.py): the
host must be a public address or inside a network the operator trusts
(`server.image_url_allowed_networks`), however the URL spells it and whatever a name resolves
to when we connect (`GuardedResolver` pins the connection to the checked address). No
redirects (a public URL must not bounce us inside), no environment proxies (we could not check
them), a total timeout, and the size limit counted as the bytes arrive. Every refusal is a
`SpecError` naming `input_reference`, said so that a person can fix the request.
"""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address

from serving.config import ServerConfig
from serving.egress import AddressPolicy, ForbiddenAddress, GuardedResolver, is_loopback_name, literal_address
from serving.jobs.reference import FIELD, Upload, image_url_of
from serving.pipeline.spec import SpecError

MAX_URL_LENGTH = 2048


def remote_url(value) -> str | None:
    """The http(s) URL of an input_reference (in any form image_url_of reads), or None."""
    url = image_url_of(value)
    return url if isinstance(url, str) and url.lower().startswith(("http://", "https://")) else None


def check_image_url(url: str, server: ServerConfig):
    """The URL parsed (yarl, as aiohttp will), if every rule that needs no DNS passes."""
    from yarl import URL

    if not server.fetch_image_urls:
        raise SpecError(FIELD, "remote image URLs are not fetched by this server; send the image itself, as a "
                               "multipart file or a data: URL")
    if len(url) > MAX_URL_LENGTH:
        raise SpecError(FIELD, f"image_url is {len(url)} characters; the limit is {MAX_URL_LENGTH}")
    try:
        parsed = URL(url)
        parsed.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise SpecError(FIELD, f"image_url is not a valid URL: {exc}") from None
    if not parsed.raw_host or parsed.user or parsed.password:
        raise SpecError(FIELD, "image_url must be an absolute http(s) URL without credentials")
    host = parsed.raw_host
    address = literal_address(parsed.host if ":" in host else host.removesuffix("."))
    if address is None:
        try:  # what the resolver will do with the name: refuse here what it would choke on
            host.removesuffix(".").encode("idna")
        except UnicodeError:
            raise SpecError(FIELD, f"image_url's host {host[:80]!r} is not a valid name (an empty label, or one over "
                                   "63 characters)") from None
    if address is None and is_loopback_name(host):
        address = IPv4Address("127.0.0.1")
    policy = AddressPolicy(server.image_url_allowed_networks)
    trusted = address is not None and policy.trusts(address)
    reason = policy.refusal(address) if address is not None and not trusted else None
    if reason is not None:
        raise SpecError(FIELD, f"image_url host {host!r} is not an address this server fetches from: {reason}")
    # Any port inside a trusted network; elsewhere only the listed ones (a public host's other
    # ports are its mail, database and admin interfaces, not its images).
    if not trusted and parsed.port not in server.image_url_ports:
        raise SpecError(FIELD, f"image_url port {parsed.port} is not one this server fetches from (server."
                               f"image_url_ports: {', '.join(map(str, server.image_url_ports))})")
    return parsed


async def fetch_image(url: str, server: ServerConfig, dns=None) -> Upload:
    """The image at `url` (SpecError naming input_reference when it cannot or may not be had)."""
    import aiohttp

    check_image_url(url, server)
    resolver = GuardedResolver(AddressPolicy(server.image_url_allowed_networks), dns)
    timeout = aiohttp.ClientTimeout(total=server.image_fetch_timeout_seconds)
    limit = server.max_image_bytes
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver), trust_env=False,
                                         timeout=timeout) as session:
            async with session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise SpecError(FIELD, f"fetching image_url answered HTTP {response.status}; it must answer 200 "
                                           "with the image (redirects are not followed)")
                data = bytearray()
                async for chunk in response.content.iter_chunked(64 << 10):
                    data += chunk
                    if len(data) > limit:
                        raise SpecError(FIELD, f"the image at image_url passed {limit} bytes (the limit)")
                return Upload(bytes(data), content_type=response.headers.get("content-type", ""))
    except ForbiddenAddress as exc:
        raise SpecError(FIELD, f"image_url is not fetched: {exc}") from None
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise SpecError(FIELD, f"image_url could not be fetched ({type(exc).__name__}: {exc or 'timed out'})") from None

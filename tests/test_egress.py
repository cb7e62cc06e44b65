"""Where webhooks may go: every spelling of a loopback, private, link-local, unique-local,
multicast or unspecified address is refused when the job is created, names are judged by
what they resolve to, and the operator's `allowed_networks` lifts the refusal.

No test here sends a packet anywhere: addresses are checked by the check itself, and the
resolver path resolves only numeric hosts and `localhost` (/etc/hosts)."""

from __future__ import annotations

import asyncio

import pytest

from conftest import WEBHOOK_SECRET
from serving.config import ConfigError, WebhooksConfig, load_config
from serving.egress import AddressPolicy, ForbiddenAddress, GuardedResolver
from serving.webhooks import WebhookURLError, check_webhook_url

PUBLIC_ONLY = WebhooksConfig(secret=WEBHOOK_SECRET)

# host as written in the URL -> what the refusal must say it is
FORBIDDEN = {
    # the list
    "169.254.169.254": "link-local",
    "[::1]": "loopback",
    "2130706433": "loopback",
    "0": "unspecified",
    "[::ffff:127.0.0.1]": "loopback",
    "localhost": "loopback",
    # other spellings of loopback
    "127.0.0.1": "loopback",
    "127.1": "loopback",
    "0177.0.0.1": "loopback",
    "0x7f.1": "loopback",
    "0x7f000001": "loopback",
    "017700000001": "loopback",
    "127.0.0.1.": "loopback",
    "LOCALHOST.": "loopback",
    "api.localhost": "loopback",
    "１２７.０.０.１": "loopback",  # fullwidth digits: IDNA maps them to 127.0.0.1
    "ｌｏｃａｌｈｏｓｔ": "loopback",
    "[0:0:0:0:0:0:0:1]": "loopback",
    "[::127.0.0.1]": "loopback",  # IPv4-compatible
    "[2002:7f00:1::]": "loopback",  # 6to4 of 127.0.0.1
    # unspecified
    "0.0.0.0": "unspecified",
    "[::]": "unspecified",
    # link-local, including wrapped in IPv6
    "[fe80::1]": "link-local",
    "[fe80::1%25eth0]": "link-local",
    "[::ffff:169.254.169.254]": "link-local",
    "[::ffff:a9fe:a9fe]": "link-local",
    "[64:ff9b::169.254.169.254]": "link-local",  # NAT64
    "2852039166": "link-local",  # 169.254.169.254 as one number
    # private and shared
    "10.0.0.1": "private",
    "012.0.0.1": "private",  # octal 10.0.0.1
    "172.16.5.4": "private",
    "192.168.1.1": "private",
    "[::ffff:10.1.2.3]": "private",
    "100.64.0.1": "carrier-grade NAT",
    # unique-local and site-local IPv6
    "[fc00::1]": "unique-local",
    "[fd12:3456::1]": "unique-local",
    "[fec0::1]": "site-local",
    # multicast and broadcast
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "[ff02::1]": "multicast",
    "255.255.255.255": "broadcast",
    # reserved and special-purpose
    "240.0.0.1": "reserved",
    "192.0.2.1": "not globally routable",  # documentation
    "198.18.0.1": "not globally routable",  # benchmarking
}


@pytest.mark.parametrize("host", list(FORBIDDEN))
def test_every_spelling_of_a_non_public_address_is_refused(host):
    for url in (f"http://{host}/hook", f"https://{host}:8443/hook?x=1"):
        with pytest.raises(WebhookURLError, match="webhooks.allowed_networks") as refused:
            check_webhook_url(url, PUBLIC_ONLY, WEBHOOK_SECRET)
        assert FORBIDDEN[host] in str(refused.value), str(refused.value)


@pytest.mark.parametrize("url", ["https://8.8.8.8/hook", "https://[2606:4700:4700::1111]/hook",
                                 "https://[::ffff:8.8.8.8]/hook", "https://hooks.example.com/hook",
                                 "https://hooks.example.com./hook", "https://bücher.example/hook"])
def test_public_addresses_and_names_pass_the_create_time_check(url):
    # Names are not resolved here: what they resolve to is checked when the event is sent.
    assert check_webhook_url(url, PUBLIC_ONLY, WEBHOOK_SECRET) == url


def test_invalid_host_names_are_refused():
    for url in ("http://exa mple.com/x", "http://a..b/x", "http://-x-/y"):
        with pytest.raises(WebhookURLError, match="not a valid host name"):
            check_webhook_url(url, PUBLIC_ONLY, WEBHOOK_SECRET)


def test_allowed_networks_let_the_operators_own_networks_through():
    trusted = WebhooksConfig(secret=WEBHOOK_SECRET, allowed_networks=["127.0.0.0/8", "::1/128", "10.0.0.0/8"])
    for host in ("127.0.0.1", "2130706433", "0x7f.1", "[::1]", "[::ffff:127.0.0.1]", "localhost", "10.9.8.7"):
        assert check_webhook_url(f"http://{host}:9/hook", trusted, WEBHOOK_SECRET)
    for host, kind in (("169.254.169.254", "link-local"), ("192.168.0.1", "private"), ("[fd00::1]", "unique-local")):
        with pytest.raises(WebhookURLError, match=kind):
            check_webhook_url(f"http://{host}/hook", trusted, WEBHOOK_SECRET)


def test_allowed_networks_must_be_cidrs():
    assert load_config(None, environ={"DITSERVE_WEBHOOKS__ALLOWED_NETWORKS": "[10.0.0.0/8, 'fd00::/8', 10.1.2.3]"}
                       ).webhooks.allowed_networks == ["10.0.0.0/8", "fd00::/8", "10.1.2.3/32"]
    for value, reason in (("[10.0.0.1/8]", "has host bits set"), ("[intranet]", "does not appear to be")):
        with pytest.raises(ConfigError) as error:
            load_config(None, environ={"DITSERVE_WEBHOOKS__ALLOWED_NETWORKS": value})
        [problem] = error.value.problems
        assert "webhooks.allowed_networks" in problem and "CIDR" in problem and reason in problem, problem


def resolve(policy: AddressPolicy, host: str):
    async def run():
        resolver = GuardedResolver(policy)  # over the system resolver (getaddrinfo)
        try:
            return await resolver.resolve(host, 9)
        finally:
            await resolver.close()

    return asyncio.run(run())


@pytest.mark.parametrize("host", ["localhost", "2130706433", "0x7f.1", "127.1", "0"])
def test_the_send_time_resolver_refuses_what_a_name_really_resolves_to(host):
    # The system resolver answers these from /etc/hosts or its numeric parser: no DNS traffic.
    with pytest.raises(ForbiddenAddress, match="does not call"):
        resolve(AddressPolicy(), host)


def test_the_send_time_resolver_returns_only_allowed_addresses():
    [answer] = resolve(AddressPolicy(["127.0.0.0/8"]), "0x7f.1")
    assert (answer["host"], answer["port"], answer["hostname"]) == ("127.0.0.1", 9, "0x7f.1")

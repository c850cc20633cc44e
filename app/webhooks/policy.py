"""Which URLs a job may call back: the operator's allow-list, checked when the job is submitted and again, on the
resolved addresses, right before each delivery (the connection then goes to the address that was checked)."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from app.core.errors import Unprocessable

MAX_URL_CHARS = 2048
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhooksDisabled(Unprocessable):
    code = "webhooks_disabled"


class CallbackNotAllowed(Unprocessable):
    code = "callback_url_not_allowed"


class InvalidCallback(Unprocessable):
    code = "invalid_callback_url"


@dataclass(frozen=True)
class AllowList:
    names: frozenset[str]
    suffixes: tuple[str, ...]  # "*.example.com" -> ".example.com"
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, setting: str) -> "AllowList":
        names, suffixes, networks = set(), [], []
        for entry in (e.strip().lower() for e in setting.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if entry.startswith("*."):
                suffixes.append(entry[1:])
            else:
                names.add(entry.rstrip("."))
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    @property
    def empty(self) -> bool:
        return not (self.names or self.suffixes or self.networks)

    def address_allowed(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.networks if net.version == ip.version)

    def name_allowed(self, host: str) -> bool:
        host = host.rstrip(".")
        return host in self.names or any(host.endswith(s) for s in self.suffixes)

    def host_allowed(self, host: str) -> bool:
        ip = _ip(host)
        return self.address_allowed(ip) if ip is not None else self.name_allowed(host)


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str  # lower case, IPv6 without brackets
    port: int


def parse_target(url: str) -> Target:
    if len(url) > MAX_URL_CHARS:
        raise InvalidCallback(f"callback_url is longer than {MAX_URL_CHARS} characters",
                              detail={"field": "callback_url"})
    if any(c.isspace() or ord(c) < 32 for c in url.strip()):
        raise InvalidCallback("callback_url contains whitespace or control characters",
                              detail={"field": "callback_url"})
    try:
        parts = urlsplit(url.strip())
        hostname = parts.hostname
    except ValueError as exc:
        raise InvalidCallback(f"callback_url is not a valid URL: {exc}", detail={"field": "callback_url"}) from None
    if parts.scheme not in ("http", "https"):
        raise InvalidCallback("callback_url must be an http:// or https:// URL", detail={"field": "callback_url"})
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidCallback("callback_url has an invalid port", detail={"field": "callback_url"}) from None
    if not hostname:
        raise InvalidCallback("callback_url has no host", detail={"field": "callback_url"})
    if parts.username is not None or parts.password is not None:
        raise InvalidCallback("callback_url must not carry credentials (user:password@)",
                              detail={"field": "callback_url"})
    return Target(url.strip(), parts.scheme, hostname.lower(), port)


def check_callback_url(url: str, allowed_hosts: str) -> str:
    """Submit-time check: the URL is well-formed and its host is on the operator's allow-list."""
    allow = AllowList.parse(allowed_hosts)
    if allow.empty:
        raise WebhooksDisabled("webhooks are disabled on this server: the operator has not set "
                               "DISTILLERY_WEBHOOK_ALLOWED_HOSTS, so no callback_url is accepted",
                               detail={"field": "callback_url"})
    target = parse_target(url)
    if not allow.host_allowed(target.host):
        raise CallbackNotAllowed(f"callback_url host {target.host!r} is not on this server's webhook allow-list",
                                 detail={"field": "callback_url", "host": target.host})
    return target.url


class Refused(Exception):
    """Delivery-time refusal (not allowed any more, or resolves only to addresses that are not allowed)."""


def resolve_checked(target: Target, allow: AllowList) -> IPAddress:
    """The address to connect to: the host's own (an IP literal on the list), or one it resolves to that is public
    or itself on the list. Names that resolve to loopback, private, link-local... addresses are refused unless
    those addresses are listed: an allowed name cannot be pointed at the internal network."""
    if allow.empty:
        raise Refused("webhooks are disabled on this server (empty DISTILLERY_WEBHOOK_ALLOWED_HOSTS)")
    literal = _ip(target.host)
    if literal is not None:
        if allow.address_allowed(literal):
            return literal
        raise Refused(f"address {literal} is not on the webhook allow-list")
    if not allow.name_allowed(target.host):
        raise Refused(f"host {target.host!r} is not on the webhook allow-list")
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Refused(f"could not resolve {target.host!r}: {exc}") from None
    refused = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if allow.address_allowed(ip) or ip.is_global:
            return ip
        refused.append(str(ip))
    raise Refused(f"{target.host!r} resolves only to non-public addresses {refused} that are not on the webhook "
                  "allow-list")

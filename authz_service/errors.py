"""The one exception tree of authz-service."""

from __future__ import annotations

from dataclasses import dataclass

from authz_service.model import Reason


class AuthzError(Exception):
    """Base of every error authz-service raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a config: where it is and what is wrong."""

    where: str  # e.g. "introspector 'ext'" or "server"
    field: str  # e.g. "cache_ttl" or "jwt.keys[0].pub"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field} {self.message}" if self.field else f"{self.where}: {self.message}"


class ConfigError(AuthzError):
    """A config has one or more problems; all of them are listed."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class PolicyError(AuthzError):
    """An AccessPolicy rule cannot be compiled; `path` says where in the resource (`matcho.uri`)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")


class TokenRejected(AuthzError):
    """A presented token is not acceptable (answered 401, never allowed)."""

    def __init__(self, reason: Reason) -> None:
        self.reason = reason
        super().__init__(reason.description)


class MalformedRequest(AuthzError):
    """The request cannot be judged as it is: an ambiguous path, not a route (answered 400)."""

    def __init__(self, reason: Reason) -> None:
        self.reason = reason
        super().__init__(reason.description)


class MalformedCredentials(MalformedRequest):
    """The request carries credentials in an ambiguous or broken form (answered 400)."""


class UpstreamUnavailable(AuthzError):
    """An identity provider endpoint could not give a usable answer (answered 503 unless cached)."""

    def __init__(self, endpoint: str, outcome: str, reason: Reason = Reason.IDP_UNAVAILABLE) -> None:
        # endpoint is "jwks", "discovery" or "introspection"; outcome is a short metric label such as
        # "timeout", "connect_error", "http_503", "not_json". Never the URL's secrets or a token.
        self.endpoint = endpoint
        self.outcome = outcome
        self.reason = reason  # what Check answers with it: an outage, or the IdP refusing our own credentials
        super().__init__(f"{endpoint} endpoint unavailable: {outcome}")


class PolicyTimeout(AuthzError):
    """An AccessPolicy's evaluation ran past its time budget (a regex): the request is denied."""

    def __init__(self, policy: str, what: str) -> None:
        # `what` names the rule part (`matcho.uri`), never the value it was matched against.
        self.policy = policy
        self.what = what
        super().__init__(f"policy {policy!r}: {what} ran past its time budget")


class ListenError(AuthzError):
    """A listener cannot bind its address (in use, not available, no permission): start-up stops."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"cannot listen on {address}: {reason}")


def host_port(host: str, port: int) -> str:
    """An address as a config names it: `127.0.0.1:9001`, `[::1]:9001`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_problem(address: str, reuse_port: bool = False) -> ListenError | None:
    """Why `address` would not bind now, or None: a bind of a plain socket with the options the
    listeners set (SO_REUSEADDR; SO_REUSEPORT for supervised workers), closed at once. Binders that
    give no reason of their own (grpc logs a C++ error line and raises a bare RuntimeError) are asked
    after this, so a busy port ends start-up in one line of ours."""
    import errno
    import os
    import socket

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind((host, int(port)))
    except OSError as probed:
        return ListenError(address, os.strerror(probed.errno or errno.EADDRNOTAVAIL))
    except ValueError:
        return ListenError(address, "not a host:port address")
    return None


def bind_failure(address: str, err: OSError | None = None) -> ListenError:
    """The ListenError for an address that would not bind: the OS's reason, from `err` or, when the
    binder gave none (grpc's RuntimeError), from a probe of the same address."""
    import os

    if err is not None and err.errno is not None:
        return ListenError(address, os.strerror(err.errno))
    return bind_problem(address) or ListenError(address, "the address could not be bound")

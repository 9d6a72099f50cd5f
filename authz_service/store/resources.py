"""The effective config: the config file (env-expanded) plus the store's resources, validated as one.

The file is read as it always was (`${VAR}` expanded from the environment) and must be a valid
config on its own. Store resources are appended to the file's lists (introspectors, policies,
users, roles) in id order, *not* env-expanded (a `${SECRET}` written through the API must not
pull in the service's environment), and the whole is validated by `registries.validate_config`,
the one validator `check-config` and start-up use. A resource id the file defines is the file's:
the API refuses to write it (409), and a store resource with that id is ignored.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from authz_service.config import yamlload
from authz_service.config.fields import expand_env
from authz_service.config.model import Config
from authz_service.registries import parse_config, read_config_text, validate_config
from authz_service.store.base import KINDS, Key, Resource


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """The config file as read: its env-expanded mapping, its own config, the resource ids it defines."""

    path: str | None
    raw: Mapping[str, Any]  # env-expanded
    config: Config  # the file alone
    digest: str  # sha256 of the text: a rewrite with the same content is no change

    def ids(self, kind: str) -> frozenset[str]:
        """The ids of the resources of `kind` the file defines (read-only through the API)."""
        items = self.raw.get(KINDS[kind]) or []
        return frozenset(r["id"] for r in items if isinstance(r, Mapping) and isinstance(r.get("id"), str))

    def resources(self, kind: str) -> list[Resource]:
        """The file's resources of `kind`, as written (env-expanded), each with its resourceType."""
        items = self.raw.get(KINDS[kind]) or []
        return [{"resourceType": kind, **r} for r in items if isinstance(r, Mapping)]

    def resource(self, kind: str, ident: str) -> Resource | None:
        return next((r for r in self.resources(kind) if r.get("id") == ident), None)


def read_config_file(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> ConfigFile:
    """Read and validate the config file (ConfigError listing every problem, as `load_config`)."""
    return config_file(read_config_text(path), env, str(path))


def config_file(text: str, env: Mapping[str, str] | None = None, path: str | None = None) -> ConfigFile:
    """A ConfigFile from config text (ConfigError listing every problem)."""
    environ = os.environ if env is None else env
    config = parse_config(text, environ)  # every problem, exactly as check-config lists them
    raw = yamlload.load(text) or {}
    expanded = expand_env(raw, environ, "", [])
    return ConfigFile(path, expanded, config, hashlib.sha256(text.encode()).hexdigest())


def compose(file: ConfigFile, resources: Mapping[Key, Resource]) -> Config:
    """The effective config: the file plus the store's resources; ConfigError listing every problem."""
    if not resources:
        return file.config
    merged = dict(file.raw)
    for kind, section in KINDS.items():
        own = file.ids(kind)
        added = [resources[k] for k in sorted(k for k in resources if k[0] == kind and k[1] not in own)]
        if added:
            merged[section] = [*(file.raw.get(section) or []), *added]
    return validate_config(merged, env=None)


def shadowed(file: ConfigFile, resources: Mapping[Key, Resource]) -> list[Key]:
    """Store resources the file overrides (it defines the same id): ignored, worth a warning."""
    return sorted(k for k in resources if k[1] in file.ids(k[0]))


# -- what leaves the service -------------------------------------------------------------------

_SECRET_FIELDS: Mapping[str, tuple[tuple[str, ...], ...]] = {
    "TokenIntrospector": (("jwt", "secret"), ("introspection_endpoint", "authorization")),
    "User": (("password",), ("twoFactor",)),
}


def without_secrets(kind: str, resource: Resource) -> dict[str, Any]:
    """A copy without the fields that hold secrets (jwt.secret, a key's `k`, the introspection
    endpoint's authorization, a User's password): what GET and every answer show."""
    result: dict[str, Any] = copy.deepcopy(dict(resource))
    for path in _SECRET_FIELDS.get(kind, ()):
        parent: Any = result
        for name in path[:-1]:
            parent = parent.get(name) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    if kind == "TokenIntrospector":
        jwt = result.get("jwt")
        keys = jwt.get("keys") if isinstance(jwt, dict) else None
        for key in keys if isinstance(keys, list) else []:
            if isinstance(key, dict):
                key.pop("k", None)
    return result


def json_problem(value: Any, path: str = "") -> str | None:
    """Why `value` is not plain JSON data (a YAML date, a binary, a non-string key, NaN), or None."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return f"{where or 'the resource'} has the key {key!r}, which is not a string (quote it)"
                stack.append((child, f"{where}.{key}" if where else key))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{where} is {item}, which JSON cannot hold"
        elif item is not None and not isinstance(item, str | int | bool):
            return f"{where} is a YAML {type(item).__name__}, not JSON data (quote it to make it a string)"
    return None

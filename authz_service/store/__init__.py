"""Where resources written through the resource API live, and how every process learns of changes.

`base` (what a store is), `file` (a directory of YAML files) and `redis` (a hash, a counter and a
channel), and `resources` (the effective config: the config file plus a store's resources).
"""

from __future__ import annotations

from authz_service.config.model import StoreConfig
from authz_service.store.base import ResourceStore


def open_store(config: StoreConfig) -> ResourceStore:
    """The store `api.store` describes (not yet opened: call `await store.open()`)."""
    if config.backend == "redis":
        from authz_service.store.redis import RedisStore

        assert config.url is not None  # guaranteed by config validation
        return RedisStore(config.url, config.prefix)
    from authz_service.store.file import FileStore

    assert config.path is not None  # guaranteed by config validation
    return FileStore(config.path)

"""The config: `model` (frozen values), `fields` (reading raw mappings), `validate` (raw -> model).

Import the model from here or from `config.model`; `config.validate` (load_config, parse_config)
is imported explicitly, because it uses the token and policy packages, which use the model.
"""

from authz_service.config.model import (
    CacheConfig,
    Config,
    IntrospectorConfig,
    JwtIntrospectorConfig,
    LoggingConfig,
    OpaqueIntrospectorConfig,
    PolicyConfig,
    Predicate,
    ResponseConfig,
    ServerConfig,
    StaticKey,
    TlsConfig,
)

__all__ = [
    "CacheConfig",
    "Config",
    "IntrospectorConfig",
    "JwtIntrospectorConfig",
    "LoggingConfig",
    "OpaqueIntrospectorConfig",
    "PolicyConfig",
    "Predicate",
    "ResponseConfig",
    "ServerConfig",
    "StaticKey",
    "TlsConfig",
]

"""The config: `model` (frozen values), `fields` (reading raw mappings), `validate` (raw -> model,
asking a `registry.Registries` for what lives above config: policy engines, key loaders).

Import the model from here or from `config.model`. Callers load configs through
`authz_service.registries` (load_config, parse_config), which hands validation the real registries.
"""

from authz_service.config.model import (
    CacheConfig,
    CompiledRule,
    Config,
    IntrospectorConfig,
    JwtIntrospectorConfig,
    Listen,
    LoggingConfig,
    OpaqueIntrospectorConfig,
    PolicyConfig,
    ResponseConfig,
    ServerConfig,
    StaticKey,
    TlsConfig,
)

__all__ = [
    "CacheConfig",
    "CompiledRule",
    "Config",
    "IntrospectorConfig",
    "JwtIntrospectorConfig",
    "Listen",
    "LoggingConfig",
    "OpaqueIntrospectorConfig",
    "PolicyConfig",
    "ResponseConfig",
    "ServerConfig",
    "StaticKey",
    "TlsConfig",
]

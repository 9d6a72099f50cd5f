"""authz-service: an Envoy external-authorization (ext_authz) gRPC service."""

__version__ = "0.1.0"

"""Generated protobuf/gRPC code (Envoy ext_authz subset); regenerate with `python scripts/gen_proto.py`."""

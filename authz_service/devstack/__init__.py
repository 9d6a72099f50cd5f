"""The development stack: the demo, a demo identity provider, an echo upstream and an Envoy launcher.

Used by `authz-service demo`, the tests and the benchmarks; never imported by the service itself
(ruff's banned-api rule keeps it so). Envoy comes from the `[demo]` extra.
"""

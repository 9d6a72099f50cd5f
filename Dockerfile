# authz-service container image.
#
#   docker build -t authz-service:dev .
#   docker run --rm -v "$PWD/examples/jwt-secret.yaml:/etc/authz-service/config.yaml:ro" \
#       -p 9001:9001 -p 9002:9002 authz-service:dev
#
# The image runs `authz-service`; arguments go to it (`--config FILE`, `check-config FILE`).
# docker-compose.yml also runs the demo IdP and echo upstream from this image by overriding the
# entrypoint with `python -m authz_service.devstack.idp` / `python -m authz_service.devstack.echo`.

# ---- build: turn the source tree into a wheel, so no source tree or build tooling ships ----
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package build reads (pyproject's `readme` is README.md).
COPY pyproject.toml README.md ./
COPY authz_service ./authz_service
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime ----
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Installs the package and its dependencies (all ship manylinux wheels: no compiler needed), with
# no extra: the image carries no Envoy (`authz-service[demo]` is for the demo on a workstation).
COPY --from=build /wheels /tmp/wheels
RUN pip install /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels

# A fixed numeric uid/gid, so Kubernetes' `runAsNonRoot` can verify it without a name lookup.
RUN groupadd --system --gid 10001 authz \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin authz \
    && mkdir -p /etc/authz-service
USER 10001:10001

# 9001: ext_authz gRPC + grpc.health.v1 + reflection. 9002: admin HTTP (/healthz /readyz /metrics).
EXPOSE 9001 9002

# Liveness of the process through the admin server, with nothing but the Python already here.
# (A config with `admin_address: null` or another admin port needs `--no-healthcheck` or its own check.)
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9002/healthz', timeout=2)"]

ENTRYPOINT ["authz-service"]
CMD ["--config", "/etc/authz-service/config.yaml"]

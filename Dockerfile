# authz-service container image.
#
#   docker build -t authz-service:dev .
#   docker run --rm -v "$PWD/examples/jwt-secret.yaml:/etc/authz-service/config.yaml:ro" \
#       -p 9001:9001 -p 9002:9002 authz-service:dev
#
# The image runs `authz-service`; arguments go to it (`--config FILE`, `check-config FILE`).
# docker-compose.yml also runs the demo IdP and echo upstream from this image by overriding the
# entrypoint with `python -m authz_service.devstack.idp` / `python -m authz_service.devstack.echo`.

# ---- build: the locked dependencies and the package into one virtualenv, nothing else ----
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/authz-service

# The same uv the ./dev script pins.
RUN pip install uv==0.13.9

WORKDIR /src
# Dependencies first, in their own layer: exactly uv.lock (versions and hashes), the runtime set only
# (no extra, no dependency group: the image carries no Envoy and no test tools). --locked fails the
# build if uv.lock does not match pyproject.toml.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-default-groups --no-editable --no-install-project
# Then the package itself, installed (not linked) into the same environment.
COPY authz_service ./authz_service
RUN uv sync --locked --no-default-groups --no-editable

# ---- runtime ----
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/authz-service/bin:$PATH

# The environment keeps its build path, so its scripts' interpreter lines stay true; its Python is
# this image's /usr/local/bin/python3 (the same base image as the build stage).
COPY --from=build /opt/authz-service /opt/authz-service

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

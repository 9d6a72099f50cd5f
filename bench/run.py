"""authz-service benchmark: one command, loopback only, every load bounded.

    python bench/run.py                 # full run (~13 min)
    python bench/run.py --quick         # smoke run (~4 min)
    python bench/run.py --scenarios noop,es256-jwks,es256-w2
    python bench/run.py --list

It starts the dev identity provider (bench/idp_server.py), the floors (a no-op grpc.aio Check
server, bench/noop_server.py, and a no-op aiohttp server, bench/noop_http_server.py), one
authz-service process per scenario on the shipped defaults plus the scenario's own settings, and
for the Envoy scenarios a real Envoy (the dev stack's launcher, authz_service.devstack.envoy)
plus the echo upstream. Every scenario's answer is checked with a real gRPC (or HTTP) client
before it is measured. Results: a markdown table on stdout and in bench/results/latest.md, and
the concurrency sweep's plots next to it (bench/results/*.png). See docs/performance.md.

The parts: procs.py (processes, meters), load.py (h2load, wrk, grpc_load.py), scenarios.py
(the scenarios' shared machinery and most scenarios), overload.py (5x overload) with
overload_probe.py, sweep.py (concurrency sweep) and plots.py, micro_decision_log.py,
catalog.py (names, bounds, order), report.py; this file is the command line and the progress line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _reexec_in_venv() -> None:
    """Run under the project's .venv when started with a Python that lacks the dependencies."""
    try:
        import grpc  # noqa: F401
        import yaml  # noqa: F401

        import authz_service  # noqa: F401
    except ImportError:
        if not os.environ.get("AUTHZ_BENCH_REEXEC"):
            os.environ["AUTHZ_BENCH_REEXEC"] = "1"
            for candidate in (
                ROOT / ".venv" / "bin" / "python",
                Path(os.environ.get("VIRTUAL_ENV", "/nonexistent")) / "bin" / "python",
            ):
                if candidate.exists():
                    os.execv(str(candidate), [str(candidate), *sys.argv])
        sys.exit("bench: run ./dev setup first (needs the project's .venv), or run with .venv/bin/python")


sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))
_reexec_in_venv()

# Imported only once the interpreter is known to have the dependencies.
import argparse  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import TextIO  # noqa: E402

import plots  # noqa: E402
from catalog import SCENARIOS, plan, time_limit  # noqa: E402
from load import ensure_tools  # noqa: E402
from procs import stop_all  # noqa: E402
from report import background_busy, brief, busy_text, machine_info, report  # noqa: E402
from scenarios import FULL, QUICK, Bench  # noqa: E402

RESULTS = BENCH / "results"


class Progress:
    """One progress line on stderr: scenario i of n and the time elapsed.

    On a terminal it is redrawn in place (\\r) every second, with each finished scenario printed
    above it; otherwise (a log, CI) it is plain lines, one when a scenario starts and one when it ends.
    """

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.index = 0
        self.name = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def _elapsed(self) -> str:
        seconds = int(time.monotonic() - self.started)
        return f"{seconds // 60}:{seconds % 60:02d}"

    def _status(self) -> str:
        return f"bench: scenario {self.index} of {self.total} ({self.name}), {self._elapsed()} elapsed"

    def _draw(self) -> None:
        with self._lock:
            if self.index:
                self.stream.write("\r\x1b[K" + self._status())
                self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self._draw()

    def say(self, text: str) -> None:
        """A line of its own (above the progress line on a terminal)."""
        with self._lock:
            self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
            self.stream.flush()
        if self.tty:
            self._draw()

    def begin(self, name: str) -> None:
        self.index += 1
        self.name = name
        if not self.tty:
            self.say(self._status())
            return
        self._draw()
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="bench-progress", daemon=True)
            self._ticker.start()

    def end(self, outcome: str, seconds: float) -> None:
        self.say(f"bench: [{self.index}/{self.total}] {self.name}: {seconds:.0f} s, {outcome}")

    def close(self) -> None:
        """Stop redrawing and clear the line (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self.tty and self.index:
            with self._lock:
                self.stream.write("\r\x1b[K")
                self.stream.flush()


def draw_plots(bench: Bench, info: dict[str, str], out: Path, profile: str) -> None:
    """The sweep's PNGs next to the report (a quick run's prefixed `quick-`, so a smoke run never
    replaces the pictures docs/performance.md shows); their paths, or why none, in bench.extra."""
    points = bench.extra.get("sweep")
    if not points:
        return
    missing = plots.available()
    if missing:
        bench.extra["plots_missing"] = missing
        print(f"bench: no plots: {missing}", file=sys.stderr)
        return
    title = (
        f"{info.get('cpus (nproc)', '?')} vCPU {info.get('cpu model', '')}, {profile} run, {time.strftime('%Y-%m-%d')}, "
        f"commit {info.get('commit', '?')}\nload generator, servers and Envoy on the same cores"
    )
    prefix = "quick-" if profile == "quick" else ""
    bench.extra["plots"] = plots.write(points, out.parent, prefix, title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short smoke run (~4 min)")
    parser.add_argument("--scenarios", help="comma-separated subset (the floors are always measured)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.md", help="where to write the markdown")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, bodies)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(SCENARIOS))
        return 0
    names = list(SCENARIOS)
    if args.scenarios:
        wanted = [n.strip() for n in args.scenarios.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in SCENARIOS]
        if unknown:
            parser.error(f"unknown scenario(s): {', '.join(unknown)}; see --list")
        names = ["noop", *[n for n in wanted if n != "noop"]]
    profile = QUICK if args.quick else FULL
    ensure_tools()
    workdir = Path(tempfile.mkdtemp(prefix="authz-bench-"))
    bench = Bench(profile, workdir)
    order = plan(names, profile)
    progress = Progress(len(order))
    started = time.monotonic()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        info = machine_info()
        progress.say("bench: " + ", ".join(f"{k} {v}" for k, v in info.items()))
        pool = profile.fill_entries + 30_000 if ("rss-100k" in names or "opaque-uncached" in names) else 0
        bench.start_idp(pool)
        for name in order:
            progress.begin(name)
            scenario_started = time.monotonic()
            row = bench.run_one(name, SCENARIOS[name], time_limit(name, profile))
            progress.end(brief(row), time.monotonic() - scenario_started)
        progress.close()
        bench.finish_ratios()
        stop_all()
        info["background CPU load after the run"] = busy_text(background_busy(1.0))
        draw_plots(bench, info, args.out, profile.name)
        text = report(bench, info, profile, time.monotonic() - started, args.out.parent)
    except KeyboardInterrupt:
        progress.close()
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        progress.close()
        stop_all()
        if args.keep:
            print(f"bench: logs and configs in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"bench: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

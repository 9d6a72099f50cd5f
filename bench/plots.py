"""PNG plots of the concurrency sweep (bench/sweep.py), drawn with matplotlib's Agg backend.

- `<prefix>sweep-throughput.png`: checks/s against connections, one line per curve, log y (the
  HTTP floor is several times the other curves);
- `<prefix>sweep-latency.png`: p50 and p99 latency against connections, log y.

gRPC curves are solid, HTTP curves dashed, and the three through-Envoy curves dotted, each
curve in its own colour in both files. matplotlib comes with the `bench` extra
(`pip install -e '.[bench]'`, which `./dev bench` does); without it the run writes no plots and
says so.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from sweep import LABELS, LEVELS, Point

STYLES: Final = {
    "noop-grpc": ("tab:gray", "-", "o"),
    "authz-grpc": ("tab:blue", "-", "o"),
    "noop-http": ("tab:gray", "--", "s"),
    "noop-http-granian": ("tab:brown", "--", "v"),
    "authz-http": ("tab:green", "--", "s"),
    "envoy-grpc": ("tab:blue", ":", "^"),
    "envoy-http": ("tab:green", ":", "^"),
    "envoy-jwt-authn": ("tab:red", ":", "D"),
}


def available() -> str | None:
    """None when matplotlib can draw; else why not."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'; ./dev bench does)"
    return None


def _pyplot() -> Any:
    # Imported by name: matplotlib is the bench extra's, and `./dev test` type-checks bench/
    # in a venv without it.
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def _pyplot_ticker() -> Any:
    return importlib.import_module("matplotlib.ticker")


def write(points: Sequence[Point], out_dir: Path, prefix: str, title: str) -> list[Path]:
    """Draw both plots into out_dir; the files written."""
    plt = _pyplot()

    out_dir.mkdir(parents=True, exist_ok=True)
    curves = [key for key in LABELS if any(p.target == key for p in points)]

    def series(key: str) -> list[Point]:
        return sorted((p for p in points if p.target == key), key=lambda p: p.connections)

    def axes_style(ax: Any) -> None:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(LEVELS))
        ax.set_xticklabels([str(level) for level in LEVELS])
        ax.set_xlabel("connections (one request in flight each)")
        ax.grid(True, which="both", alpha=0.3)

    written: list[Path] = []
    ticker = _pyplot_ticker()
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for key in curves:
        color, line, marker = STYLES[key]
        data = series(key)
        ax.plot(
            [p.connections for p in data],
            [p.rate for p in data],
            color=color,
            linestyle=line,
            marker=marker,
            label=LABELS[key],
        )
    axes_style(ax)
    ax.set_yscale("log")  # the HTTP floor is ~5x the others: on a linear axis they would be squashed
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_ylabel("checks/s, log scale (requests/s through Envoy)")
    ax.set_title(f"Throughput against concurrency\n{title}", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = out_dir / f"{prefix}sweep-throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(12, 6.5), sharey=True)
    for ax, (name, attr) in zip(axes, (("p50", "p50_ms"), ("p99", "p99_ms")), strict=True):
        for key in curves:
            color, line, marker = STYLES[key]
            data = series(key)
            ax.plot(
                [p.connections for p in data],
                [getattr(p, attr) for p in data],
                color=color,
                linestyle=line,
                marker=marker,
                label=LABELS[key],
            )
        axes_style(ax)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(f"{name} latency", fontsize=10)
    axes[0].set_ylabel("ms per request (log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4)
    fig.suptitle(f"Latency against concurrency\n{title}", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = out_dir / f"{prefix}sweep-latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written

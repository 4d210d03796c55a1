"""The picture of a ``make bench`` results file: makespan against N (the
number of agents) for each system measured, with the compute floor and the
lower bound of each size drawn in beside them.

``make bench`` draws ``benchmarks/results/latest.png`` at the end of its
run; to draw a results file again without running anything:

    python -m benchmarks.plot                          # latest.json -> latest.png
    python -m benchmarks.plot RESULTS.json [-o OUT.png]
    python -m benchmarks.plot A.json B.json -o OUT.png # runs of several files in one picture

It uses matplotlib's Agg backend (no display needed). A size measured for
only one N shows as points; a system that could not run at a size (direct at
N = 250, say) is left out there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"

#: how each system is drawn, in the order of the legend
STYLES = {
    "aiosd": {"color": "#1f77b4", "marker": "o"},
    "gateway": {"color": "#9467bd", "marker": "D"},
    "direct": {"color": "#d62728", "marker": "s"},
    "shared": {"color": "#ff7f0e", "marker": "^"},
}
FLOOR_STYLE = {"color": "#2ca02c", "marker": "_", "linestyle": "--", "markersize": 22,
               "markeredgewidth": 2.5}
BOUND_STYLE = {"color": "#7f7f7f", "marker": "x", "linestyle": ":"}
LABEL_BOX = {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}
LABELS = {"aiosd": "aiosd", "gateway": "aiosd through the gateway (openai package)",
          "direct": "direct (each agent loads the model)",
          "shared": "shared (one llama_cpp.server)"}


def series(result: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Each system's (N, makespan in seconds), by N; runs that did not
    happen (no makespan) are left out."""
    out: dict[str, list[tuple[int, float]]] = {}
    for run in result.get("runs", []):
        if run.get("makespan_s") is None:
            continue
        out.setdefault(run["system"], []).append((int(run["n"]), float(run["makespan_s"])))
    return {system: sorted(points) for system, points in out.items()}


def floors(result: dict[str, Any]) -> list[tuple[int, float, float]]:
    """The compute floor of each size: (N, lower, higher) of the two
    measurements, before and after that size's runs."""
    out = []
    for n, floor in result.get("floor", {}).items():
        both = [floor[k] for k in ("before_s", "after_s") if floor.get(k) is not None]
        if both:
            out.append((int(n), min(both), max(both)))
    return sorted(out)


def bounds(result: dict[str, Any]) -> list[tuple[int, float]]:
    """The lower bound of each size: (N, seconds)."""
    return sorted((int(n), float(s)) for n, s in result.get("lower_bound_s", {}).items()
                  if s is not None)


def _ticks(low: float, high: float) -> list[float]:
    """Round values (1, 2, 5 times a power of ten) from ``low`` to ``high``."""
    ticks, scale = [], 0.1
    while scale <= high * 10:
        ticks += [m * scale for m in (1, 2, 5) if low <= m * scale <= high]
        scale *= 10
    return ticks


def merged(files: list[Path]) -> dict[str, Any]:
    """The runs, floors and bounds of several results files as one (a size
    measured in two files: the later file's)."""
    out: dict[str, Any] = {"runs": [], "floor": {}, "lower_bound_s": {}}
    for path in files:
        result = json.loads(Path(path).read_text())
        sizes = {str(run["n"]) for run in result.get("runs", [])}
        out["runs"] = [r for r in out["runs"] if str(r["n"]) not in sizes] + result.get("runs", [])
        out["floor"].update(result.get("floor", {}))
        out["lower_bound_s"].update(result.get("lower_bound_s", {}))
    return out


def draw(results: Path | list[Path], out: Path | None = None) -> Path:
    """Draw the results file ``results`` (or several, merged) into ``out``
    (by default the first file's name ending in .png) and return where it
    went."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    files = results if isinstance(results, list) else [results]
    result = merged(files)
    out = Path(out) if out is not None else Path(files[0]).with_suffix(".png")
    systems = series(result)
    floor_points, bound_points = floors(result), bounds(result)
    # with one size, the floor and the bound are points: name them there
    single = len({p[0] for points in systems.values() for p in points}
                 | {p[0] for p in floor_points} | {p[0] for p in bound_points}) == 1

    fig = Figure(figsize=(8, 6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values: list[float] = []
    ns: set[int] = set()
    order = [s for s in STYLES if s in systems] + [s for s in systems if s not in STYLES]
    for system in order:
        points = systems[system]
        x, y = [p[0] for p in points], [p[1] for p in points]
        ax.plot(x, y, linestyle="-", linewidth=2, markersize=8, label=LABELS.get(system, system),
                **STYLES.get(system, {"marker": "o"}))
        for n, s in points:
            ax.annotate(f"{s:.1f} s", (n, s), textcoords="offset points", xytext=(9, 0),
                        va="center", fontsize=9, color=STYLES.get(system, {}).get("color", "black"),
                        bbox=LABEL_BOX)
        values += y
        ns.update(x)
    if floor_points:
        x = [p[0] for p in floor_points]
        mid = [(p[1] + p[2]) / 2 for p in floor_points]
        spread = [[m - p[1] for m, p in zip(mid, floor_points)],
                  [p[2] - m for m, p in zip(mid, floor_points)]]
        ax.errorbar(x, mid, yerr=spread, capsize=6, linewidth=1.5,
                    label="compute floor (measured before and after the runs)", **FLOOR_STYLE)
        for n, lo, hi in floor_points if single else []:
            text = f"floor {lo:.1f} s" if round(lo, 1) == round(hi, 1) else f"floor {lo:.1f}–{hi:.1f} s"
            ax.annotate(text, (n, (lo + hi) / 2), textcoords="offset points", xytext=(-16, 0),
                        ha="right", va="center", fontsize=9, color=FLOOR_STYLE["color"])
        values += [p[1] for p in floor_points] + [p[2] for p in floor_points]
        ns.update(x)
    if bound_points:
        x, y = [p[0] for p in bound_points], [p[1] for p in bound_points]
        ax.plot(x, y, linewidth=1.5, markersize=8, label="lower bound", **BOUND_STYLE)
        for n, s in bound_points if single else []:
            ax.annotate(f"bound {s:.1f} s", (n, s), textcoords="offset points", xytext=(-12, 0),
                        ha="right", va="center", fontsize=9, color=BOUND_STYLE["color"])
        values += y
        ns.update(x)

    if not values:
        ax.text(0.5, 0.5, "no makespan in this results file", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
    else:
        ax.set_xscale("log")
        ax.set_yscale("log")
        # room on both sides for the labels, and around a single N
        ax.set_xlim(min(ns) / 2.2, max(ns) * 2.2)
        low, high = min(values) / 1.4, max(values) * 1.4
        ax.set_ylim(low, high)
        ax.xaxis.set_major_locator(FixedLocator(sorted(ns)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_major_locator(FixedLocator(_ticks(low, high)))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("N, agents running at once")
        ax.set_ylabel("makespan, seconds (log scale; lower is better)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=9,
                  frameon=False)
    machine = result.get("machine", {})
    where = ""
    if machine.get("cpus"):
        where = f" ({machine['cpus']} CPUs, {machine.get('memory_gb', '?')} GB)"
    ax.set_title(f"make bench: time for N agents to finish the workload{where}", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", type=Path, default=[DEFAULT_RESULTS],
                        help="results files of benchmarks.run, drawn together "
                             "(default: %(default)s)")
    parser.add_argument("-o", "--out", type=Path,
                        help="the picture to write (default: the results file's name, .png)")
    args = parser.parse_args()
    print(f"plot: {draw(args.results, args.out)}")


if __name__ == "__main__":
    main()

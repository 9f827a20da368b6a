"""Run every peer scenario in one process, interleaved and repeated; write docs/benchmarks.md and .png.

Usage: ``python benchmarks/report.py [--reps 7] [--out docs]`` (needs ``.[bench]`` and ``redis-server``
on the PATH; a private server is started on a free loopback port). Each repetition runs every case
of every scenario once, in a rotated order, so drift on a noisy machine hits all cases alike; a
ratio is the median over repetitions of (case / baseline) measured in the same repetition.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _peers as peers

INNER = {"sync_l1_hit": 15, "async_l1_hit": 3, "l2_hit": 2, "l2_concurrent": 1, "get_many": 3}
PACKAGES = ["tiercache", "cachetools", "cachebox", "cashews", "aiocache", "dogpile.cache", "redis", "orjson"]


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def measure(scenarios: dict[str, peers.Scenario], reps: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per operation: {scenario: {case: [one per repetition]}}."""
    out: dict[str, dict[str, list[float]]] = {k: {c: [] for c in s.cases} for k, s in scenarios.items()}
    for rep in range(reps):
        for key, scenario in scenarios.items():
            names = list(scenario.cases)
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                case = scenario.cases[name]
                samples = []
                for _ in range(INNER[key]):
                    started = time.perf_counter()
                    case.run()
                    samples.append((time.perf_counter() - started) / case.per_call)
                out[key][name].append(statistics.median(samples))
        print(f"  repetition {rep + 1}/{reps} done", file=sys.stderr)
    return out


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-6:
        return f"{seconds * 1e9:,.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:,.1f} µs"
    return f"{seconds * 1e3:,.2f} ms"


def ratios(times: dict[str, list[float]], group: peers.Group) -> dict[str, float]:
    """Median over repetitions of member / baseline (paired within each repetition)."""
    base = times[group.baseline]
    return {
        m: statistics.median(t / b for t, b in zip(times[m], base, strict=True))
        for m in group.members
        if m in times
    }


def write_chart(path: Path, rows: list[tuple[str, dict[str, float], peers.Group]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(11, 1.1 + 0.45 * sum(len(r[1]) for r in rows)))
    if len(rows) == 1:
        axes = [axes]
    for ax, (title, rs, group) in zip(axes, rows, strict=True):
        names = sorted(rs, key=lambda n: rs[n])
        values = [rs[n] for n in names]
        colors = [
            "#d62728" if n.startswith("tiercache") else "#7f7f7f" if n == group.baseline else "#1f77b4"
            for n in names
        ]
        ax.barh(names, values, color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        if group.target is not None:
            ax.axvline(group.target[1], color="#d62728", linestyle="--", linewidth=0.8)
        if max(values) / max(min(values), 1e-9) > 20:
            ax.set_xscale("log")
        ax.set_title(f"{title}: ratio to {group.baseline} (dashed line: target)", fontsize=8, loc="left")
        ax.tick_params(labelsize=8)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}x", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="repetitions of every case (default 15)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs"))
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    with peers.own_redis() as server:
        print("building scenarios", file=sys.stderr)
        scenarios: dict[str, peers.Scenario] = {
            "sync_l1_hit": peers.sync_l1_hit(),
            "async_l1_hit": peers.async_l1_hit(),
            "l2_hit": peers.l2_hit(server),
            "l2_concurrent": peers.l2_concurrent(server),
        }
        if peers.has_get_many_cached():
            scenarios["get_many"] = peers.get_many(server)
        try:
            times = measure(scenarios, args.reps)
            probes = {
                f"{s.title}: {what}": probe() for s in scenarios.values() for what, probe in s.probes.items()
            }
        finally:
            for s in scenarios.values():
                s.close()
        print("stampede", file=sys.stderr)
        herd = peers.stampede(server)
        redis_version = server.version
    print("import time", file=sys.stderr)
    imports = peers.import_times(reps=11)

    lines = [
        "# Benchmarks: tiercache beside its peers",
        "",
        "Generated by `python benchmarks/report.py` (pytest form: `python -m pytest benchmarks "
        "--benchmark-enable`). Every number below comes from one run of one process: each repetition "
        "runs every case once, interleaved, and a ratio is the median over repetitions of the case's "
        "time divided by its baseline's time *in the same repetition*. Absolute times move with the "
        "machine's load; ratios are what to compare.",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; "
        f"{args.reps} repetitions; run took {time.monotonic() - started:.0f} s",
        f"- machine: {_cpu()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        "shared and noisy (other jobs ran at the same time)",
        f"- Python {platform.python_version()} ({platform.python_implementation()}); "
        f"redis-server {redis_version} on loopback (private instance, persistence off)",
        "- versions: " + ", ".join(f"{p} {_version(p)}" for p in PACKAGES),
        "",
        "## Targets (issues 7 and 8)",
        "",
        "| target | measured | ceiling | result |",
        "|---|---:|---:|---|",
    ]
    chart_rows: list[tuple[str, dict[str, float], peers.Group]] = []
    tables: list[str] = []
    for key, scenario in scenarios.items():
        for group in scenario.groups:
            rs = ratios(times[key], group)
            chart_rows.append((group.name, rs, group))
            if group.target is not None:
                who, ceiling = group.target
                ok = "pass" if rs[who] <= ceiling else "**fail**"
                lines.append(f"| {who} / {group.baseline} | {rs[who]:.3f}x | {ceiling}x | {ok} |")
            tables += [
                f"### {group.name}: {scenario.title}",
                "",
                f"Baseline: {group.baseline}.",
                "",
                "| case | median time per operation | ratio to baseline |",
                "|---|---:|---:|",
            ]
            for name in sorted(rs, key=lambda n: rs[n]):
                t = statistics.median(times[key][name])
                bold = "**" if name.startswith("tiercache") else ""
                tables.append(f"| {bold}{name}{bold} | {_fmt_time(t)} | {rs[name]:.3f}x |")
            tables += [f"\n{note}" for note in scenario.notes] + [""]
    herd_tc = [r for r in herd if r.name.startswith("tiercache")]
    lines.append(
        "| stampede: loader calls for "
        f"{peers.STAMPEDE_CALLERS} callers of a cold key | "
        + ", ".join(str(r.loader_calls) for r in herd_tc)
        + " | 1 | "
        + ("pass" if all(r.loader_calls == 1 for r in herd_tc) else "**fail**")
        + " |"
    )
    tc_import = imports["importtime tiercache (µs)"] / imports["importtime json (µs)"]
    lines.append(
        f"| `import tiercache` / `import json` (-X importtime, cumulative) | {tc_import:.1f}x | 3x | "
        + ("pass" if tc_import <= 3 else "**fail**")
        + " |"
    )
    if "get_many" not in scenarios:
        lines.append(
            "| get_many_cached of 100 keys in L2: one round trip | not measured | 1 | "
            "`TieredCache.get_many_cached` does not exist yet |"
        )
    else:
        trips = next(v for k, v in probes.items() if "get_many_cached" in k)
        n = sum(trips.values())
        lines.append(
            f"| get_many_cached of 100 keys in L2: Redis commands per call | {n} {trips} | 1 | "
            + ("pass" if n == 1 else "**fail**")
            + " |"
        )
    lines += ["", "![ratios](benchmarks.png)", "", "## Timings", "", *tables]
    lines += [
        "## Stampede",
        "",
        f"{peers.STAMPEDE_CALLERS} asyncio tasks ask at once for one cold key whose loader sleeps "
        f"{peers.STAMPEDE_LOAD * 1e3:.0f} ms, all in one process; Redis commands counted with "
        "`INFO commandstats` on the private server (connection set-up such as HELLO included).",
        "",
        "| contender | loader calls | Redis commands | per waiter | wall time | errors | commands |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in herd:
        detail = ", ".join(f"{k} {v}" for k, v in sorted(r.commands.items()))
        lines.append(
            f"| {r.name} | {r.loader_calls} | {r.total_commands} | "
            f"{r.total_commands / peers.STAMPEDE_CALLERS:.2f} | {r.seconds * 1e3:.0f} ms | "
            f"{r.errors} | {detail} |"
        )
    lines += [
        "",
        "## Import time",
        "",
        "Fresh interpreters, interleaved; `-X importtime` cumulative time of the top-level module, and "
        "the wall time of `python -c 'import X'` minus `python -c pass`.",
        "",
        "| measure | value |",
        "|---|---:|",
        *(f"| {k} | {v:,.1f} |" for k, v in imports.items()),
        "",
    ]
    if probes:
        lines += ["## Other facts from the run", ""]
        lines += [f"- {k}: {v}" for k, v in probes.items()] + [""]
    (out_dir / "benchmarks.md").write_text("\n".join(lines))
    write_chart(out_dir / "benchmarks.png", chart_rows)
    targets = lines.index("## Targets (issues 7 and 8)")
    print("\n".join(lines[targets : lines.index("![ratios](benchmarks.png)")]))
    print(f"wrote {out_dir / 'benchmarks.md'} and benchmarks.png in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()

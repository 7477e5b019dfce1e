"""Records of one gpu_check run, the results files and the summary table.

One ``<YYYY-MM-DD>-<gpu>-<topic>.json`` per topic in ``shared/BENCHMARKS.md``'s format (topic,
commit, device, versions, cases), plus two lists of this run: ``checks`` (correctness and
sanitizer records: status pass / fail / skip, detail, errors against their bounds) and
``skipped`` (items or baselines not run, with why).  The file name's GPU slug is
``benchmarks.results.device_slug``'s, so both writers name files alike.
"""

import datetime
import json
import os
from dataclasses import asdict, dataclass, field

from benchmarks.results import _sig, device_slug

STATUSES = ("pass", "fail", "skip")


@dataclass
class Check:
    """One correctness (or sanitizer) result: ``status`` is pass, fail or skip."""

    topic: str
    name: str
    status: str
    dtype: str | None = None
    shape: dict | str | None = None
    detail: str = ""
    err: float | None = None
    bound: float | None = None
    seconds: float | None = None

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


@dataclass
class Run:
    """Everything one run produced, grouped by topic when written."""

    checks: list = field(default_factory=list)
    cases: dict = field(default_factory=dict)  # topic -> [case dict in BENCHMARKS.md format]
    skipped: dict = field(default_factory=dict)  # topic -> ["item: why", ...]
    timings: list = field(default_factory=list)  # (item key, estimated s, actual s)

    def add_case(self, topic, case):
        self.cases.setdefault(topic, []).append(case)

    def add_skip(self, topic, what, why):
        self.skipped.setdefault(topic, []).append(f"{what}: {why}")
        print(f"  skipped: {what}: {why}", flush=True)

    def topics(self):
        seen = [c.topic for c in self.checks] + list(self.cases) + list(self.skipped)
        return list(dict.fromkeys(seen))


def case(name, shape, dtype, unit_fast_ms, baselines_ms, host_syncs=None, peak_mem_mb=None, **extra):
    """A results case (BENCHMARKS.md): median milliseconds of unit_fast and each baseline."""
    out = {
        "name": name,
        "shape": shape,
        "dtype": dtype,
        "metric": "median_ms",
        "unit_fast": None if unit_fast_ms is None else _sig(unit_fast_ms),
        "baselines": {k: (None if v is None else _sig(v)) for k, v in baselines_ms.items()},
        "host_syncs": host_syncs,
        "peak_mem_mb": peak_mem_mb,
    }
    out.update({k: v for k, v in extra.items() if v is not None and v != {}})
    return out


def exit_code(checks):
    """1 when any check failed, else 0 (skips are not failures; the summary lists them)."""
    return 1 if any(c.status == "fail" for c in checks) else 0


def results_files(run, meta, out_dir, date=None):
    """Writes one JSON per topic of ``run`` under ``out_dir``; returns the paths.

    ``meta``: ``{"commit", "device", "versions"}`` (``device``: the CUDA device's name).
    ``date``: ``YYYY-MM-DD`` (default: today, UTC).
    """
    date = date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    slug = device_slug("cuda", meta["device"])
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for topic in run.topics():
        doc = {
            "topic": topic,
            "commit": meta.get("commit"),
            "device": meta["device"],
            "versions": meta["versions"],
            "cases": run.cases.get(topic, []),
            "checks": [asdict(c) for c in run.checks if c.topic == topic],
            "skipped": run.skipped.get(topic, []),
        }
        path = os.path.join(out_dir, f"{date}-{slug}-{topic}.json")
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        paths.append(path)
    return paths


def _ratio(base, ours):
    if base is None or not ours:
        return "-"
    return f"{base / ours:.2f}x"


def summary(run):
    """The stdout table: checks by topic (pass / fail / skip counts and every failure), then one
    line per benchmark case with each baseline's time as a multiple of unit_fast's."""
    lines = ["", "== correctness =="]
    lines.append(f"{'topic':<18} {'pass':>5} {'fail':>5} {'skip':>5}")
    for topic in dict.fromkeys(c.topic for c in run.checks):
        mine = [c for c in run.checks if c.topic == topic]
        counts = [sum(c.status == s for c in mine) for s in STATUSES]
        lines.append(f"{topic:<18} {counts[0]:>5} {counts[1]:>5} {counts[2]:>5}")
    for c in run.checks:
        if c.status != "pass":
            where = " ".join(x for x in (c.name, c.dtype or "", _shape_text(c.shape)) if x)
            lines.append(f"  {c.status.upper()} {c.topic}: {where}: {c.detail}")
    lines += ["", "== benchmarks (median ms; baseline / unit_fast) =="]
    for topic, cases in run.cases.items():
        for k in cases:
            base = ", ".join(f"{b} {v if v is not None else '-'} ({_ratio(v, k['unit_fast'])})"
                             for b, v in k["baselines"].items())
            mem = "" if k.get("peak_mem_mb") is None else f", peak {k['peak_mem_mb']} MiB"
            syncs = "" if k.get("host_syncs") is None else f", syncs {k['host_syncs']}"
            head = f"{topic}:{k['name']} [{k['dtype']}] unit_fast {k['unit_fast']}"
            lines.append(f"{head}{mem}{syncs} | {base}")
    if any(run.skipped.values()):
        lines += ["", "== skipped =="]
        for topic, whys in run.skipped.items():
            lines += [f"{topic}: skipped: {w}" for w in whys]
    if run.timings:
        lines += ["", "== seconds (estimate -> actual) =="]
        lines += [f"{key:<44} {est:>5.0f} -> {act:.1f}" for key, est, act in run.timings]
    verdict = "FAILED" if exit_code(run.checks) else "ok"
    fails = sum(c.status == "fail" for c in run.checks)
    lines += ["", f"gpu_check: {verdict} ({fails} failing check(s) of {len(run.checks)})"]
    return "\n".join(lines)


def _shape_text(shape):
    if isinstance(shape, dict):
        return "(" + ", ".join(f"{k}={v}" for k, v in shape.items()) + ")"
    return shape or ""

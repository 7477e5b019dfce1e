"""Writes a results file (shared/BENCHMARKS.md, "Results files") from a pytest-benchmark JSON.

    python -m pytest benchmarks --benchmark-only --benchmark-json run.json
    python -m benchmarks.results --in run.json --topic lsa --out benchmarks/results/

It only converts what the run recorded: the commit, versions and device names come from the
run's ``machine_info["unit_fast"]`` (benchmarks/conftest.py), each figure from one timed
case's median.  A case whose unit_fast provider was not timed (skipped, failed) is left
out, and a CUDA results file is refused when the run timed nothing on CUDA.

One file per device: ``--device cuda`` (the default when the run timed CUDA cases) or
``--device cpu``.  Each unit_fast provider of a group gives one case; its baselines are the
other providers timed in that group on the same device.  The file is named
``<YYYY-MM-DD>-<device slug>-<topic>.json`` after the run's date (UTC).
"""

import argparse
import glob
import json
import os
import re
import sys

# Vendor and filler words left out of a device slug.
KEYWORDS_DROPPED = {"nvidia", "geforce", "tesla", "intel", "amd", "cpu", "processor"}


# Per-case figures some benchmarks record besides time and memory (bench_unit_step: samples per
# step, so samples/s = samples_per_step / median; memory per sample).
_CARRIED = ("samples_per_step", "peak_mem_mb_per_sample")


def device_slug(device_type, name):
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``; ``"Intel(R) Xeon(R) Processor (2 cores)"`` ->
    ``"cpu-xeon-2c"``: the model, up to its first token with a digit."""
    if device_type == "cuda":
        words = [w for w in re.split(r"[\s\-_]+", name.lower()) if w and w not in KEYWORDS_DROPPED]
        kept = []
        for w in words:
            kept.append(re.sub(r"[^a-z0-9]", "", w))
            if re.search(r"\d", w):
                break
        return "-".join(k for k in kept if k) or "gpu"
    cores = re.search(r"\((\d+) cores\)$", name)
    model = re.sub(r"\(\d+ cores\)$|@.*$|\d+-core", "", name.lower()).replace("(r)", "").replace("(tm)", "")
    words = [re.sub(r"[^a-z0-9]", "", w) for w in model.split()]
    words = [w for w in words if w and w not in KEYWORDS_DROPPED]
    return "-".join(["cpu", *words, *([f"{cores.group(1)}c"] if cores else [])])


def _sig(x, digits=4):
    return float(f"{x:.{digits}g}")


def _fail(msg):
    raise SystemExit(f"benchmarks.results: {msg}")


def _newest_autosave():
    runs = sorted(glob.glob(os.path.join(".benchmarks", "*", "*.json")), key=os.path.getmtime)
    if not runs:
        _fail("no --in given and no .benchmarks/*/*.json (pytest --benchmark-autosave) to read")
    return runs[-1]


def build_results(run, topic, device):
    """The results-file dict of ``device``'s cases in ``run`` (a loaded pytest-benchmark JSON)."""
    info = run.get("machine_info", {}).get("unit_fast")
    if info is None:
        _fail("the run has no machine_info['unit_fast']: it was not recorded by benchmarks/conftest.py")
    device_name = info["devices"].get(device)
    entries = [
        b for b in run.get("benchmarks", [])
        if b.get("extra_info", {}).get("device") == device and "provider" in b["extra_info"]
    ]
    if not entries or device_name is None:
        kind = "GPU" if device == "cuda" else "CPU"
        _fail(f"refusing to write {kind} figures: the run timed no {device} case (nothing measured there)")

    groups = {}  # (op, case) -> entries, in the run's order
    for b in entries:
        groups.setdefault((b["extra_info"]["op"], b["extra_info"]["case"]), []).append(b)
    names = [case for _, case in groups]
    cases = []
    for (op, case), members in groups.items():
        ours = [b for b in members if b["extra_info"]["role"] == "unit_fast"]
        if not ours:
            print(f"benchmarks.results: {op}:{case} on {device}: unit_fast was not timed; left out",
                  file=sys.stderr)
            continue
        baselines = {
            b["extra_info"]["provider"]: _sig(b["stats"]["median"] * 1e3)
            for b in sorted(members, key=lambda b: b["extra_info"]["provider"])
            if b["extra_info"]["role"] == "baseline"
        }
        # Peak memory side by side too, where the run recorded it (CUDA): the attention targets
        # are about memory as much as time.
        baseline_mem = {
            b["extra_info"]["provider"]: b["extra_info"]["peak_mem_mb"]
            for b in sorted(members, key=lambda b: b["extra_info"]["provider"])
            if b["extra_info"]["role"] == "baseline" and b["extra_info"].get("peak_mem_mb") is not None
        }
        base_extra = {b["extra_info"]["provider"]: {k: b["extra_info"][k] for k in _CARRIED if k in b["extra_info"]}
                      for b in members if b["extra_info"]["role"] == "baseline"
                      and any(k in b["extra_info"] for k in _CARRIED)}
        notes = {b["extra_info"]["provider"]: b["extra_info"]["note"] for b in members
                 if b["extra_info"]["role"] == "baseline" and "note" in b["extra_info"]}
        primary = min((b["extra_info"]["provider"] for b in ours), key=len)
        base_name = case if names.count(case) == 1 else f"{op}:{case}"
        for b in ours:
            extra = b["extra_info"]
            variant = extra["provider"].removeprefix(primary).lstrip("_")
            cases.append({
                "name": f"{base_name}+{variant}" if variant else base_name,
                "shape": extra["shape"],
                "dtype": extra["dtype"],
                "metric": "median_ms",
                "unit_fast": _sig(b["stats"]["median"] * 1e3),
                "baselines": baselines,
                "host_syncs": extra.get("host_syncs"),
                "peak_mem_mb": extra.get("peak_mem_mb"),
                **({"baselines_peak_mem_mb": baseline_mem} if baseline_mem else {}),
                **({"baselines_notes": notes} if notes else {}),
                **{k: extra[k] for k in _CARRIED if k in extra},
                **({"baselines_extra": base_extra} if base_extra else {}),
            })
    if not cases:
        _fail(f"no {device} case has a timed unit_fast provider; nothing to write")

    commit = info.get("commit")
    if commit is None:
        print("benchmarks.results: the run's checkout had no commit (git rev-parse HEAD failed); "
              "commit is null", file=sys.stderr)
    elif run.get("commit_info", {}).get("dirty"):
        print(f"benchmarks.results: the run's working tree was dirty; figures may not match {commit}",
              file=sys.stderr)
    return {
        "topic": topic,
        "commit": commit,
        "device": device_name,
        "versions": info["versions"],
        "cases": cases,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="inp",
                        help="pytest-benchmark JSON (default: the newest .benchmarks/ autosave)")
    parser.add_argument("--topic", required=True, help="e.g. lsa")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"), help="output folder")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="whose cases to write (default: cuda if the run timed any, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file of the same name")
    args = parser.parse_args(argv)

    path = args.inp or _newest_autosave()
    with open(path) as f:
        run = json.load(f)
    device = args.device
    if device is None:
        timed = {b.get("extra_info", {}).get("device") for b in run.get("benchmarks", [])}
        device = "cuda" if "cuda" in timed else "cpu"
    results = build_results(run, args.topic, device)

    date = run["datetime"][:10]  # ISO, UTC: the day the run ended
    name = f"{date}-{device_slug(device, results['device'])}-{args.topic}.json"
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, name)
    if os.path.exists(out) and not args.overwrite:
        _fail(f"{out} exists; pass --overwrite to replace it")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(out)
    return out


if __name__ == "__main__":
    main()

"""Choose every method's hyperparameters on tuning seeds and tuning people, never on the test.

Exact commands (repository root)::

    python benchmarks/tune.py --quick                       # -> benchmarks/tuned/biography-quick.json
    python benchmarks/tune.py --quick --methods ewc,replay --seeds 2
    python benchmarks/compare.py --quick --tuned benchmarks/tuned/biography-quick.json --seeds 5
    python benchmarks/tune.py --show benchmarks/tuned/biography-default.json   # the record as a table

Protocol. Each method gets the same budget: the configurations in :data:`GRIDS` (at most
:data:`BUDGET` per method, its registered default among them; methods without a knob have the
one configuration), each run on the **tuning seeds** (default 1000, 1001, …: other people, other
biographies, other initialisations than the test seeds 0, 1, …) and scored on the **tuning
people** (``Task.tune_evaluate``: held-out people disjoint from the test people that the reported
tables score). The rule, fixed before any run:

    among the configurations whose mean new-task gain (R[j][j] − R[j−1][j]) is at least
    ``0.9 ×`` seq's, take the one with the highest mean final Task-0 accuracy; if none is,
    take the one with the highest mean new-task gain.

The output file records the tuning seeds, the split, the rule, every configuration's per-seed
numbers and the choice; ``compare.py --tuned FILE`` applies the choices and refuses test seeds
that were used for tuning.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import compare as C
from benchmarks import methods as M

BUDGET = 4
"""Configurations per method (the equal tuning budget)."""

GRIDS: dict[str, list[dict[str, Any]]] = {
    "freeze-bottom": [{"layers": v} for v in (0.25, 0.5, 0.75, 1.0)],
    "agem": [{"memory_size": v} for v in (16, 32, 64, 128)],  # 64: the registered default
    "ogd": [{"directions_per_task": v} for v in (4, 8, 16, 32)],
    # {}: the library's scale 100. Two decades apart over six: on the default biography preset
    # (tuning seed 1000) scales 10-1e4 learned nothing new (gain <= 0.014 vs seq's 0.861),
    # 0.1 gained 0.66 and 0.01 gained 0.84; on the fact-recall testbed 100 is what works
    "ewc": [{}, {"scale": 0.01}, {"scale": 1.0}, {"scale": 1e4}],
    "curvature": [{}, {"replay_weight": 0.3}, {"replay_weight": 3.0}, {"replay_weight": 10.0}],  # {}: 1
    "clip": [{"max_norm": v} for v in (0.1, 0.5, 1.0, 5.0)],
    "replay": [{"fraction": v} for v in (0.1, 0.25, 0.5, 0.75)],
    "lrcp": [{}, {"energy": 0.9}, {"energy": 0.95}, {"energy": 0.999}],  # {}: the library's 0.99
}
"""Each method's configurations (``--hp`` keys; ``{}`` is the registered default); a method not
listed runs its defaults once."""

PLASTICITY_FLOOR = 0.9
DEFAULT_TUNING_SEED = 1000


def grid(name: str) -> list[dict[str, Any]]:
    """The configurations of method ``name`` (``[{}]``: its defaults only).

    Raises:
        ValueError: a grid larger than :data:`BUDGET`, or one without the method's default.
    """
    g = GRIDS.get(name, [{}])
    if len(g) > BUDGET:
        raise ValueError(f"GRIDS[{name!r}] has {len(g)} configurations; the budget is {BUDGET}")
    defaults = M.get(name).defaults
    if not any(all(defaults.get(k) == v for k, v in c.items()) for c in g):  # {} always matches
        raise ValueError(f"GRIDS[{name!r}] = {g} does not contain the registered default {defaults}")
    return g


def choose(candidates: list[dict[str, Any]], seq_gain: float) -> int:
    """Index of the chosen candidate under the module's rule (each candidate has the means
    ``task0_final`` and ``plasticity_gain``)."""
    ok = [i for i, c in enumerate(candidates) if c["plasticity_gain"] >= PLASTICITY_FLOOR * seq_gain]
    if ok:
        return max(ok, key=lambda i: (candidates[i]["task0_final"], candidates[i]["plasticity_gain"]))
    return max(range(len(candidates)), key=lambda i: candidates[i]["plasticity_gain"])


def _means(entry: dict[str, Any]) -> dict[str, Any]:
    per = [{"seed": r["seed"], "task0_final": r["metrics"]["task0_final"],
            "plasticity_gain": r["metrics"]["plasticity_gain"]} for r in entry["seeds"]]
    return {"task0_final": statistics.fmean(p["task0_final"] for p in per),
            "plasticity_gain": statistics.fmean(p["plasticity_gain"] for p in per), "per_seed": per}


def tune(base: C.BenchConfig, methods: list[str]) -> dict[str, Any]:
    """Run every configuration of every method on ``base``'s seeds, scored on tuning items.

    Returns:
        the tuning record (see the module doc): ``{"scenario", "preset", "tuning_seeds",
        "rule", "budget", "seq", "methods": {name: {"candidates", "chosen", "hp"}}, "wall_s"}``.
    """
    t0 = time.perf_counter()
    cfg = replace(base, methods=["seq"], evaluate_on="tune", tuned=None)
    seq = _means(C.run_benchmark(cfg)["methods"]["seq"])
    out: dict[str, Any] = {
        "scenario": base.scenario, "preset": base.preset,
        "tuning_seeds": list(range(base.seed_base, base.seed_base + base.seeds)),
        "evaluated_on": "tuning people (Task.tune_evaluate)",
        "rule": f"max mean Task-0 accuracy among configurations with mean new-task gain >= "
                f"{PLASTICITY_FLOOR} x seq's; else max new-task gain",
        "budget": BUDGET, "seq": seq, "methods": {},
    }
    for name in methods:
        if name == "seq":
            continue
        cands = []
        for hp in grid(name):
            overrides = {**base.hp, **{f"{name}.{k}": v for k, v in hp.items()}}
            res = C.run_benchmark(replace(cfg, methods=[name], hp=overrides))
            entry = res["methods"][name]
            if entry["status"] != "ok":
                cands.append({"hp": hp, "status": entry["status"], "message": entry["message"],
                              "task0_final": float("-inf"), "plasticity_gain": float("-inf")})
                continue
            cands.append({"hp": hp, "status": "ok", **_means(entry)})
            print(f"[tune] {name} {hp}: Task-0 {cands[-1]['task0_final']:.3f}, gain "
                  f"{cands[-1]['plasticity_gain']:.3f} (seq gain {seq['plasticity_gain']:.3f})", flush=True)
        k = choose(cands, seq["plasticity_gain"])
        out["methods"][name] = {"candidates": cands, "chosen": k, "hp": cands[k]["hp"]}
    out["wall_s"] = time.perf_counter() - t0
    return out


def load_tuned(path: str | Path, scenario: str, preset: str) -> dict[str, Any]:
    """A tuning record written by :func:`main`, checked against the run's scenario and preset.

    Raises:
        ValueError: another scenario or preset than the run's.
    """
    rec = json.loads(Path(path).read_text())
    if (rec.get("scenario"), rec.get("preset")) != (scenario, preset):
        raise ValueError(f"--tuned {str(path)!r} was tuned on {rec.get('scenario')}/{rec.get('preset')}, "
                         f"not {scenario}/{preset}: tune this setting (benchmarks/tune.py)")
    return rec


def table(rec: dict[str, Any]) -> str:
    """A tuning record as a markdown table: one row per configuration (mean over the tuning
    seeds of the final Task-0 accuracy and the new-task gain, per-seed values in brackets), the
    chosen one in bold; seq's figures in the header line."""
    seq = rec["seq"]
    def cell(c: dict[str, Any], key: str, pct: bool) -> str:
        per = " / ".join(f"{p[key] * (100 if pct else 1):.{1 if pct else 3}f}" for p in c.get("per_seed", []))
        mean = c[key] * (100 if pct else 1)
        return f"{mean:.{1 if pct else 3}f}" + (" %" if pct else "") + (f" ({per})" if per else "")
    lines = [f"Tuning seeds {rec['tuning_seeds']}, scored on {rec['evaluated_on']}; seq: Task-0 "
             f"{cell(seq, 'task0_final', True)}, gain {cell(seq, 'plasticity_gain', False)}. "
             f"Rule: {rec['rule']}.", "",
             "| method | configuration | Task-0 acc (per seed) | new-task gain (per seed) | chosen |",
             "|---|---|---:|---:|---|"]
    for name, m in rec["methods"].items():
        for i, c in enumerate(m["candidates"]):
            hp = ", ".join(f"{k}={v}" for k, v in c["hp"].items()) or "defaults"
            chosen = i == m["chosen"]
            if c.get("status", "ok") != "ok":
                lines.append(f"| {name} | {hp} | {c['status']} | {c.get('message', '')} | |")
                continue
            b = "**" if chosen else ""
            lines.append(f"| {name} | {b}{hp}{b} | {cell(c, 'task0_final', True)} | "
                         f"{cell(c, 'plasticity_gain', False)} | {'yes' if chosen else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scenario", default="biography", choices=("biography",))
    p.add_argument("--preset", default=None, choices=C.PRESETS)
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--methods", default=None, help="comma list (default: the preset's methods)")
    p.add_argument("--seeds", type=int, default=2, help="number of tuning seeds")
    p.add_argument("--seed-base", type=int, default=DEFAULT_TUNING_SEED,
                   help="first tuning seed (keep it away from the test seeds 0, 1, ...)")
    p.add_argument("--out", default=None, help="output file (default: benchmarks/tuned/<scenario>-<preset>.json)")
    p.add_argument("--cache-dir", default=".cache/mitigate-bench")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--show", default=None, metavar="FILE",
                   help="print the tuning record FILE as a markdown table and exit (runs nothing)")
    a = p.parse_args(argv)
    if a.show:
        rec = json.loads(Path(a.show).read_text())
        print(table(rec))
        return rec
    preset = a.preset or ("quick" if a.quick else "default")
    cfg = C.BenchConfig(scenario=a.scenario, preset=preset, seeds=a.seeds, seed_base=a.seed_base,
                        cache_dir=a.cache_dir, workers=a.workers, plots=False, ref_every=0,
                        methods=None if a.methods is None else a.methods.split(","))
    rec = tune(cfg, list(cfg.methods or []))
    out = Path(a.out or Path(__file__).parent / "tuned" / f"{a.scenario}-{preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1, default=str))
    print(f"wrote {out} in {rec['wall_s']:.0f}s", flush=True)
    return rec


if __name__ == "__main__":
    main()

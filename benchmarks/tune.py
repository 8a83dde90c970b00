"""Choose every method's hyperparameters on tuning seeds and tuning people, never on the test.

Exact commands (repository root)::

    python benchmarks/tune.py --quick                       # -> benchmarks/tuned/biography-quick.json
    python benchmarks/tune.py --quick --methods ewc,replay --seeds 2
    python benchmarks/compare.py --quick --tuned benchmarks/tuned/biography-quick.json --seeds 5
    python benchmarks/tune.py --show benchmarks/tuned/biography-default.json   # the record as a table
    python benchmarks/tune.py --methods seq,agem,ogd --merge benchmarks/tuned/biography-default.json

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
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import compare as C
from benchmarks import methods as M

BUDGET = 4
"""Configurations per method (the equal tuning budget)."""

GRIDS: dict[str, list[dict[str, Any]]] = {
    # 1, 2 and 3 of the default preset's 4 blocks with the embeddings, and 2 without them (the
    # earlier 1.0 froze the same 3 blocks as 0.75: at least one block is always left to train)
    "freeze-bottom": [{"layers": 0.25}, {"layers": 0.5}, {}, {"layers": 0.5, "embeddings": False}],
    # memory held (default preset: 8 batches offered per finished task, 3 finished tasks before
    # the last): 8, 16, 24 ({}: memory 64 holds all 24) and 64 of 96 offered (32 per task)
    "agem": [{"memory_size": 8}, {"memory_size": 16}, {}, {"memory_size": 64, "consolidate_batches": 32}],
    # directions per task (one per batch, so at most consolidate_batches): 4, 8 ({}: 16 asked,
    # 8 batches offered), 16 and 32
    "ogd": [{"directions_per_task": 4}, {}, {"directions_per_task": 16, "consolidate_batches": 16},
            {"directions_per_task": 32, "consolidate_batches": 32}],
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
listed runs its defaults once. Every configuration must *bind*: no two of a method's may set the
same run on the scenario being tuned (:func:`effective`, checked by :func:`check_binding` before
anything runs), so each method really gets its :data:`BUDGET` of distinct configurations."""

PLASTICITY_FLOOR = 0.9
log = logging.getLogger(__name__)
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


@dataclass(frozen=True)
class Layout:
    """What decides whether a configuration binds on a scenario: its number of transformer
    blocks and the number of training batches of each task (Task 0 first)."""

    num_layers: int
    batches_per_task: tuple[int, ...]

    @classmethod
    def of_biography(cls, preset: str) -> Layout:
        """The layout of a biography preset, from its config alone (nothing is built)."""
        from benchmarks import biography

        cfg = biography.resolve_config(preset)
        tasks = biography.describe(preset)["tasks"]
        return cls(cfg.num_layers, tuple(math.ceil(t["train_examples"] / cfg.batch_size) for t in tasks))


def effective(name: str, hp: dict[str, Any], layout: Layout) -> dict[str, Any]:
    """The settings that configuration ``hp`` (method ``name``'s full hyperparameters, defaults
    included, as :func:`benchmarks.compare._method_hp` gives them) actually puts into a run on
    ``layout``: two configurations with equal ``effective`` run the same.

    * freeze-bottom: the frozen block count (``layers`` as a fraction is rounded and capped so
      one block trains) and ``embeddings``.
    * agem: the batches offered per finished task (``min(consolidate_batches, batches)``) and the
      memory actually held, ``min(memory_size, Σ offered)`` over the tasks finished before the
      last one trains (the last task's memory is never used).
    * ogd: directions stored per finished task, ``min(directions_per_task, offered)`` with
      ``directions="batch"`` (one per batch), and the basis size ``min(max_basis, Σ)``.
    * every other method: ``hp`` as given.
    """
    hp = dict(hp)
    cb = int(hp.pop("consolidate_batches", 8))
    finished = layout.batches_per_task[:-1]  # tasks remembered before the last one trains
    offered = [min(cb, n) for n in finished]
    if name == "freeze-bottom":
        return {**hp, "layers": M.bottom_layers(layout.num_layers, hp["layers"])}
    if name == "agem":
        memory = int(hp.pop("memory_size"))
        return {**hp, "offered_per_task": offered, "memory_held": min(memory, sum(offered))}
    if name == "ogd" and hp.get("directions", "batch") == "batch":
        want = int(hp.pop("directions_per_task"))
        per_task = [min(want, n) for n in offered]
        return {**hp, "directions_held": per_task, "basis": min(int(hp.pop("max_basis")), sum(per_task))}
    return {**hp, "consolidate_batches": cb}


def check_binding(name: str, layout: Layout, strict: bool = False) -> list[tuple[dict[str, Any], int | None]]:
    """Each of method ``name``'s grid configurations' :func:`effective` settings on ``layout``,
    with the index of an earlier configuration that sets the same run (``None`` if none).

    Args:
        strict: raise instead of reporting a duplicate.

    Raises:
        ValueError: with ``strict``, two configurations that set the same run, naming both and
            what they set.
    """
    method = M.get(name)
    seen: dict[str, int] = {}
    out: list[tuple[dict[str, Any], int | None]] = []
    configs = grid(name)
    for i, config in enumerate(configs):
        eff = effective(name, C._method_hp(method, {f"{name}.{k}": v for k, v in config.items()}), layout)
        key = json.dumps(eff, sort_keys=True, default=str)
        same = seen.get(key)
        if same is not None and strict:
            raise ValueError(f"GRIDS[{name!r}]: {config} runs the same as {configs[same]} on this "
                             f"scenario ({eff}); replace one with a configuration that binds")
        seen.setdefault(key, i)
        out.append((eff, same))
    return out


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
    layout = Layout.of_biography(base.preset)
    binding = {name: check_binding(name, layout) for name in methods if name != "seq"}  # before any run
    cfg = replace(base, methods=["seq"], evaluate_on="tune", tuned=None)
    seq = _means(C.run_benchmark(cfg)["methods"]["seq"])
    out: dict[str, Any] = {
        **header(base), "layout": {"num_layers": layout.num_layers,
                                   "batches_per_task": list(layout.batches_per_task)},
        "seq": seq, "methods": {},
    }
    for name in methods:
        if name == "seq":
            continue
        cands = []
        for hp, (eff, same) in zip(grid(name), binding[name]):
            if same is not None:  # not run again: the method has one configuration fewer
                log.warning("tune: %s %s runs the same as %s on this scenario (%s): not run",
                            name, hp, cands[same]["hp"], eff)
                cands.append({**cands[same], "hp": hp, "same_as": same})
                continue
            overrides = {**base.hp, **{f"{name}.{k}": v for k, v in hp.items()}}
            res = C.run_benchmark(replace(cfg, methods=[name], hp=overrides))
            entry = res["methods"][name]
            if entry["status"] != "ok":
                cands.append({"hp": hp, "effective": eff, "status": entry["status"], "message": entry["message"],
                              "task0_final": float("-inf"), "plasticity_gain": float("-inf")})
                continue
            cands.append({"hp": hp, "effective": eff, "status": "ok", **_means(entry)})
            print(f"[tune] {name} {hp}: Task-0 {cands[-1]['task0_final']:.3f}, gain "
                  f"{cands[-1]['plasticity_gain']:.3f} (seq gain {seq['plasticity_gain']:.3f})", flush=True)
        k = choose(cands, seq["plasticity_gain"])
        out["methods"][name] = {"candidates": cands, "chosen": k, "hp": cands[k]["hp"]}
    out["wall_s"] = time.perf_counter() - t0
    return out


def header(base: C.BenchConfig) -> dict[str, Any]:
    """What a tuning record says about how it was made: scenario, preset, tuning seeds, where it
    was scored, the rule and the budget (:func:`merge` refuses records that differ in these)."""
    return {"scenario": base.scenario, "preset": base.preset,
            "tuning_seeds": list(range(base.seed_base, base.seed_base + base.seeds)),
            "evaluated_on": "tuning people (Task.tune_evaluate)",
            "rule": f"max mean Task-0 accuracy among configurations with mean new-task gain >= "
                    f"{PLASTICITY_FLOOR} x seq's; else max new-task gain",
            "budget": BUDGET}


def merge(record: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the methods tuned in ``update`` replacing its own (the others kept), for
    retuning some methods without rerunning all. Both must come from the same scenario, preset,
    tuning seeds, rule and budget, and their ``seq`` runs must agree (the same tuning runs).

    Raises:
        ValueError: naming the first field in which the two records differ.
    """
    for key in ("scenario", "preset", "tuning_seeds", "evaluated_on", "rule", "budget"):
        if record.get(key) != update.get(key):
            raise ValueError(f"cannot merge: {key} is {update.get(key)!r} in the new record and "
                             f"{record.get(key)!r} in the old one; tune every method again instead")
    for key in ("task0_final", "plasticity_gain"):
        if abs(record["seq"][key] - update["seq"][key]) > 1e-12:
            raise ValueError(f"cannot merge: seq's {key} differs ({update['seq'][key]} vs "
                             f"{record['seq'][key]}), so the runs are not comparable; tune every method again")
    out = {**record, "methods": {**record["methods"], **update["methods"]}}
    out["layout"] = update.get("layout", record.get("layout"))
    out["wall_s"] = record.get("wall_s", 0.0) + update.get("wall_s", 0.0)
    out["merged"] = [*record.get("merged", []), {"methods": sorted(update["methods"]),
                                                  "wall_s": update.get("wall_s")}]
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


_DERIVED = ("layers", "memory_held", "directions_held")
"""The :func:`effective` settings that ``--show`` prints beside a configuration."""


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
            derived = {k: v for k, v in c.get("effective", {}).items() if k in _DERIVED}
            if derived:
                hp += " (" + ", ".join(f"{k}={v}" for k, v in derived.items()) + ")"
            if c.get("same_as") is not None:
                hp += f" (same run as row {c['same_as'] + 1}, not run)"
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
    p.add_argument("--merge", default=None, metavar="FILE",
                   help="tune only --methods and merge them into the record FILE (same seeds and "
                        "rule; its other methods are kept); writes FILE unless --out is given")
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
    old = json.loads(Path(a.merge).read_text()) if a.merge else None
    out = Path(a.out or a.merge or Path(__file__).parent / "tuned" / f"{a.scenario}-{preset}.json")
    if old is not None:
        merge(old, {**header(cfg), "seq": old["seq"], "methods": {}})  # refuse before hours of runs
    rec = tune(cfg, list(cfg.methods or []))
    if old is not None:
        try:
            rec = merge(old, rec)
        except ValueError:  # seq came out differently: keep the runs, do not merge them
            kept = out.with_suffix(".unmerged.json")
            kept.write_text(json.dumps(rec, indent=1, default=str))
            print(f"not merged; this run's record is in {kept}", flush=True)
            raise
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1, default=str))
    print(f"wrote {out} in {rec['wall_s']:.0f}s", flush=True)
    return rec


if __name__ == "__main__":
    main()

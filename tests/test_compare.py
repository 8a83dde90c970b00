"""The benchmark harness: method registry, metrics, outputs and the micro protocol end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import compare as C
from benchmarks import methods as M
from benchmarks.report import summary_markdown, target_text

OUTPUT_FILES = ("results.json", "results.csv", "summary.csv", "summary.md", "task0_curve.png",
                "acc_matrix.png", "retention_vs_cost.png")
E2E_METHODS = ("seq", "freeze-bottom", "replay", "clip", "freeze-bottom+clip", "planned")


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    argv = ["--preset", "micro", "--methods", ",".join(E2E_METHODS), "--out", str(root),
            "--cache-dir", str(root / "cache"), "--ref-every", "2", "--strict"]
    torch.set_num_threads(1)
    results = C.main([*argv, "--run", "r1", "--workers", "2"])
    again = C.main([*argv, "--run", "r2", "--no-plots", "--workers", "1"])  # same records in-process
    return root, results, again


# ----------------------------------------------------------------------------- registry


def test_every_default_method_is_registered_and_documented():
    doc = M.__doc__
    for name in M.DEFAULT_METHODS:
        method = M.get(name)
        assert method.name == name
        for part in name.split("+"):
            assert part in doc, f"{part} missing from the methods docstring table"


def test_default_methods_depend_on_scenario_and_preset():
    assert C.BenchConfig(preset="default").methods == list(M.DEFAULT_METHODS)
    quick = C.BenchConfig(preset="quick")
    assert quick.methods == list(M.SCENARIO_DEFAULT_METHODS[("biography", "quick")])
    assert {"seq", "ewc", "curvature", "agem"} <= set(quick.methods)
    # --quick gives a paired interval (2 seeds), the default preset 3; --seeds overrides
    assert (quick.seeds, C.BenchConfig(preset="default").seeds, C.BenchConfig(preset="micro").seeds) == (2, 3, 1)
    assert C.parse_args(["--quick", "--seeds", "5"]).seeds == 5 and C.parse_args(["--quick"]).seeds == 2
    with pytest.raises(ValueError, match="seeds=0"):
        C.BenchConfig(seeds=0)
    assert C.BenchConfig(scenario="smollm2", preset="default").methods == list(M.DEFAULT_METHODS)
    reduced = C.BenchConfig(scenario="smollm2", preset="quick").methods
    assert reduced == list(M.SCENARIO_DEFAULT_METHODS[("smollm2", "quick")])
    assert "seq" in reduced and "ogd" not in reduced
    assert C.parse_args(["--scenario", "smollm2", "--quick"]).methods == reduced
    assert C.parse_args(["--scenario", "smollm2", "--quick", "--methods", "ogd"]).methods == ["ogd"]


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(ValueError, match="registered: seq"):
        M.get("nope")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        C.BenchConfig(methods=["seq+nope"])


def test_combination_runs_every_part_in_order_with_its_own_hyperparameters():
    calls = []

    def part(tag):
        def setup(model, opt, ctx):
            calls.append((tag, "setup", dict(ctx.hp)))
            return opt

        def after(ctx, t):
            calls.append((tag, "after", t))

        def extra(model, batch, ctx):
            return torch.tensor(1.0 if tag == "a" else 2.0)

        return {"setup": setup, "after_task": after, "loss_extra": extra}

    M.register("_test-a", "a", x=1)(lambda: part("a"))
    M.register("_test-b", "b", x=2)(lambda: part("b"))
    try:
        combo = M.get("_test-a+_test-b")
        assert combo.defaults == {"_test-a.x": 1, "_test-b.x": 2}
        hp = C._method_hp(combo, {"_test-b.x": 5})
        ctx = M.RunContext(model=torch.nn.Linear(1, 1), scenario=None, device=torch.device("cpu"),
                           seed=0, hp=hp)
        opt = torch.optim.SGD(ctx.model.parameters(), lr=0.1)
        assert combo.setup(ctx.model, opt, ctx) is opt
        combo.after_task(ctx, 0)
        assert float(combo.loss_extra(ctx.model, {}, ctx)) == 3.0
        assert [c[:2] for c in calls] == [("a", "setup"), ("b", "setup"), ("a", "after"),
                                          ("b", "after")]
        assert calls[0][2]["x"] == 1 and calls[1][2]["x"] == 5
    finally:
        M.METHODS.pop("_test-a")
        M.METHODS.pop("_test-b")


def test_mix_rows_replaces_the_last_rows_and_pads():
    new = {"input_ids": torch.arange(12).reshape(4, 3), "attention_mask": torch.ones(4, 3, dtype=torch.long),
           "labels": torch.arange(12).reshape(4, 3)}
    old = {"input_ids": torch.full((1, 5), 7), "attention_mask": torch.ones(1, 5, dtype=torch.long),
           "labels": torch.full((1, 5), 7)}
    mixed = M.mix_rows(new, old)
    assert mixed["input_ids"].shape == (4, 5)
    assert torch.equal(mixed["input_ids"][:3, :3], new["input_ids"][:3])
    assert (mixed["input_ids"][:3, 3:] == 0).all() and (mixed["labels"][:3, 3:] == -100).all()
    assert (mixed["attention_mask"][:3, 3:] == 0).all()
    assert torch.equal(mixed["input_ids"][3], old["input_ids"][0])


# ----------------------------------------------------------------------------- metrics


def _record(R, curve, step_ms=10.0, ref_ms=10.0):
    return {"acc_matrix": R, "first_token_matrix": R, "task0_curve": curve,
            "raw": {"step_time_ms": step_ms, "ref_step_time_ms": ref_ms, "peak_memory_mb": 1.0,
                    "consolidation_s": 0.0, "wall_s": 1.0, "lambda_max_task0": 5.0,
                    "recovery": {"after": 0.7, "recovered_gain": 0.5},
                    "cka_per_layer": [1.0, 0.9, 0.6, 0.8, 0.7], "disrupted_heads_fraction": 0.25}}


def test_metrics_follow_their_formulas():
    base = C.BaseDiagnostics(row0=[0.8, 0.1, 0.0], row0_first=[0.9, 0.2, 0.0], lambda_max=10.0,
                             extra={})
    seq = _record([[0.8, 0.1, 0.0], [0.2, 0.6, 0.1], [0.1, 0.3, 0.5]], [(0, 0.8), (5, 0.1)])
    meth = _record([[0.8, 0.1, 0.0], [0.75, 0.6, 0.1], [0.74, 0.55, 0.48]],
                   [(0, 0.8), (5, 0.7)], step_ms=11.0, ref_ms=10.0)
    m = C.compute_metrics(meth, base, seq)
    assert set(m) == set(C.METRIC_KEYS)
    assert m["task0_final"] == 0.74 and m["task0_after_task0"] == 0.8
    assert m["task0_retention"] == pytest.approx(0.74 / 0.8)
    assert m["task0_curve_min"] == 0.7
    assert m["average_accuracy"] == pytest.approx((0.74 + 0.55 + 0.48) / 3)
    assert m["backward_transfer"] == pytest.approx(((0.74 - 0.8) + (0.55 - 0.6)) / 2)
    f_m = ((0.8 - 0.74) + (0.6 - 0.55)) / 2
    f_seq = ((0.8 - 0.1) + (0.6 - 0.3)) / 2
    assert m["forgetting"] == pytest.approx(f_m)
    assert m["mitigation_pct"] == pytest.approx(100 * (f_seq - f_m) / f_seq)
    assert m["new_task_accuracy"] == pytest.approx((0.6 + 0.48) / 2)
    assert m["plasticity_vs_seq"] == pytest.approx(((0.6 + 0.48) / 2) / ((0.6 + 0.5) / 2))
    assert m["lambda_max_ratio"] == pytest.approx(0.5)
    assert m["cka_mid_layer"] == 0.6 and m["cka_drift_mid"] == pytest.approx(0.4)
    assert m["time_per_step_vs_seq"] == pytest.approx(1.1)  # (11/10) / (10/10)
    assert m["recovery_accuracy"] == 0.7 and m["disrupted_heads_fraction"] == 0.25
    assert m["retention_gap"] == pytest.approx(0.9 - 0.74 / 0.8)
    assert m["meets_target"] is True
    s = C.compute_metrics(seq, base, seq)
    assert s["mitigation_pct"] == pytest.approx(0.0) and s["plasticity_vs_seq"] == pytest.approx(1.0)
    assert s["time_per_step_vs_seq"] == pytest.approx(1.0)
    slow_ref = _record(meth["acc_matrix"], meth["task0_curve"], step_ms=11.0, ref_ms=20.0)
    seq_slow_ref = _record(seq["acc_matrix"], seq["task0_curve"], step_ms=10.0, ref_ms=20.0)
    assert C.compute_metrics(slow_ref, base, seq_slow_ref)["time_per_step_vs_seq"] == pytest.approx(1.1)
    assert C.compute_metrics(slow_ref, base, None)["time_per_step_vs_seq"] == pytest.approx(0.55)
    assert s["meets_target"] is False
    agg = C.aggregate([{"metrics": m}, {"metrics": s}])
    assert agg["task0_final"]["mean"] == pytest.approx((0.74 + 0.1) / 2)
    assert agg["task0_final"]["std"] == pytest.approx(math.sqrt(2) * (0.74 - 0.1) / 2)
    assert target_text(C.aggregate([{"metrics": m}])) == "meets"
    assert "retention −" in target_text(C.aggregate([{"metrics": s}]))


# ----------------------------------------------------------------------------- end to end


def test_micro_run_writes_every_output(micro_run):
    root, results, _ = micro_run
    out = root / "r1"
    for name in OUTPUT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert results["output_dir"] == str(out)
    md = (out / "summary.md").read_text()
    for name in E2E_METHODS:
        assert f"| {name} |" in md
    assert "distance to target" in md
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["method"] for r in rows] == list(E2E_METHODS)
    assert set(C.METRIC_KEYS) <= set(rows[0])


def test_results_schema(micro_run):
    root, _, _ = micro_run
    res = json.loads((root / "r1" / "results.json").read_text())
    assert res["schema_version"] == 1
    assert res["config"]["preset"] == "micro" and res["config"]["methods"] == list(E2E_METHODS)
    assert {"python", "torch", "transformers", "device", "cpu_count"} <= set(res["machine"])
    assert res["scenario"]["name"] == "biography"
    n_tasks = len(res["scenario"]["tasks"])
    assert n_tasks == 2
    assert len(res["baseline"]) == 1 and len(res["baseline"][0]["acc_row"]) == n_tasks
    for name in E2E_METHODS:
        entry = res["methods"][name]
        assert entry["status"] == "ok", entry["message"]
        assert isinstance(entry["hyperparameters"], dict)
        assert set(entry["aggregate"]) == set(C.METRIC_KEYS)
        (seed,) = entry["seeds"]
        assert seed["seed"] == 0
        assert set(seed["metrics"]) == set(C.METRIC_KEYS)
        R = seed["acc_matrix"]
        assert len(R) == n_tasks and all(len(r) == n_tasks for r in R)
        assert all(0.0 <= v <= 1.0 for r in R for v in r)
        assert R[0] == res["baseline"][0]["acc_row"]
        steps = [s for s, _ in seed["task0_curve"]]
        assert steps[0] == 0 and steps == sorted(steps) and seed["task0_curve"][0][1] == R[0][0]
        assert steps[-1] == res["scenario"]["config"]["curve_steps"]
        m = seed["metrics"]
        for key in ("task0_final", "task0_retention", "average_accuracy", "new_task_accuracy",
                    "step_time_ms", "ref_step_time_ms", "time_per_step_vs_seq",
                    "peak_memory_mb", "recovery_accuracy", "lambda_max_task0",
                    "lambda_max_ratio", "cka_drift_mid", "disrupted_heads_fraction",
                    "disrupted_heads_null_fraction", "disrupted_heads_null_lower_fraction"):
            assert m[key] is not None, (name, key)
        assert m["task0_final"] == R[-1][0]


def test_planned_saves_the_plan_it_chose(micro_run):
    root, _, _ = micro_run
    res = json.loads((root / "r1" / "results.json").read_text())
    (seed,) = res["methods"]["planned"]["seeds"]
    report = seed["method_report"]
    chosen = [c for c in report["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and len(report["candidates"]) >= 2
    assert chosen[0]["freeze_bottom"] == report["freeze_bottom"] and chosen[0]["ewc_scale"] == report["ewc_scale"]
    assert report["reasons"][0].startswith("verified by probing")
    assert res["methods"]["seq"]["seeds"][0]["method_report"] is None


def test_recovery_control_is_the_probe_on_the_task0_model(micro_run):
    root, _, _ = micro_run
    from benchmarks import biography
    from mitigate.diagnostics import recovery_probe

    res = json.loads((root / "r1" / "results.json").read_text())
    (base_rec,) = res["baseline"]
    control = base_rec["recovery_control"]
    sc = biography.build_scenario("micro", root / "cache", 0)
    base = C.task0_model(sc, str(root / "cache"), 0, torch.device("cpu"))
    cfg = C.BenchConfig(preset="micro")
    explicit = recovery_probe(C.plain_copy(base), sc.tasks[0].recovery, sc.tasks[0].evaluate,
                              steps=cfg.diag["recovery_steps"], lr=sc.lr * cfg.recovery_lr_scale, seed=0)
    assert control["before"] == base_rec["acc_row"][0] == explicit.before
    assert control["after"] == explicit.after and control["losses"] == pytest.approx(explicit.losses)
    assert "Recovery probe applied to that model itself (control)" in (root / "r1" / "summary.md").read_text()


def test_freezing_leaves_the_frozen_weights_untouched_and_seq_moves_them(micro_run, tmp_path):
    # same seeded protocol: the bottom layer's weights only move under seq
    root, _, _ = micro_run
    from benchmarks import biography

    sc = biography.build_scenario("micro", root / "cache", 0)
    base = C.task0_model(sc, str(root / "cache"), 0, torch.device("cpu"))
    hp = C._method_hp(M.get("freeze-bottom"), {})
    cfg = C.BenchConfig(preset="micro", methods=["freeze-bottom"], ref_every=0)
    diag = C.BaseDiagnostics([0.0, 0.0], [0.0, 0.0], None, {})
    captured = {}
    orig = M.get("freeze-bottom").after_task

    def spy(ctx, t):
        captured[t] = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        return orig(ctx, t)

    method = M.Method(**{**M.get("freeze-bottom").__dict__, "after_task": spy})
    C.run_method(method, hp, sc, base, diag, cfg, 0, torch.device("cpu"), None)
    frozen = [k for k in captured[0] if "embed_tokens" in k or "layers.0." in k]
    assert frozen
    for k in frozen:
        assert torch.equal(captured[0][k], captured[1][k]), k
    assert not torch.equal(captured[0]["lm_head.weight"], captured[1]["lm_head.weight"])


def test_runs_are_reproducible(micro_run):
    _, a, b = micro_run
    for name in E2E_METHODS:
        sa, sb = a["methods"][name]["seeds"][0], b["methods"][name]["seeds"][0]
        assert sa["acc_matrix"] == sb["acc_matrix"], name
        assert sa["task0_curve"] == sb["task0_curve"], name
        assert sa["metrics"]["lambda_max_task0"] == sb["metrics"]["lambda_max_task0"], name


def test_recompute_reproduces_the_metrics_from_results_json(micro_run, tmp_path):
    root, results, _ = micro_run
    import shutil

    shutil.copy(root / "r1" / "results.json", tmp_path / "results.json")
    again = C.main(["--recompute", str(tmp_path), "--no-plots"])
    for name in E2E_METHODS:
        a = results["methods"][name]["seeds"][0]["metrics"]
        b = again["methods"][name]["seeds"][0]["metrics"]
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], nan_ok=True) if isinstance(a[k], float) else a[k] == b[k], k
    assert (tmp_path / "summary.md").read_text() == (root / "r1" / "summary.md").read_text()


def test_unavailable_method_is_skipped_not_fatal(tmp_path, capsys):
    def setup(model, opt, ctx):
        raise M.MethodUnavailable("mitigate.Nothing is not available")

    M.METHODS["_test-missing"] = M.Method("_test-missing", "missing", setup=setup)
    try:
        res = C.main(["--preset", "micro", "--methods", "seq,_test-missing", "--out",
                      str(tmp_path), "--run", "x", "--cache-dir", str(tmp_path / "c"),
                      "--no-plots", "--ref-every", "0", "--workers", "1"])  # registered here only
    finally:
        M.METHODS.pop("_test-missing")
    entry = res["methods"]["_test-missing"]
    assert entry["status"] == "skipped" and "Nothing" in entry["message"]
    assert set(entry["aggregate"]) == set(C.METRIC_KEYS)
    assert "[skip] _test-missing" in capsys.readouterr().out
    assert "skipped" in summary_markdown(res)


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="preset='huge'"):
        C.BenchConfig(preset="huge")
    with pytest.raises(ValueError, match="seeds=0"):
        C.BenchConfig(seeds=0)
    with pytest.raises(ValueError, match="device='tpu'"):
        C.BenchConfig(device="tpu")


def test_paired_comparisons_recount_from_the_items(micro_run):
    root, results, _ = micro_run
    res = json.loads((root / "r1" / "results.json").read_text())
    comp = res["comparisons"]
    keys = {"method", "baseline", "metric", "diff", "ci95", "n_seeds", "p_holm", "distinguishable"}
    assert comp and all(keys <= set(r) for r in comp)
    seq = res["methods"]["seq"]["seeds"][0]
    for name in E2E_METHODS:
        rec = res["methods"][name]["seeds"][0]
        items = rec["final_items"]
        assert len(items) == len(rec["acc_matrix"][-1])
        for acc, it in zip(rec["acc_matrix"][-1], items):  # the items are the accuracy's items
            assert sum(it) / len(it) == pytest.approx(acc, abs=1e-12)
    rows = [r for r in comp if r["metric"] == "task0_final" and r["baseline"] == "seq"]
    assert sorted(r["method"] for r in rows) == sorted(n for n in E2E_METHODS if n != "seq")
    for r in rows:
        rec = res["methods"][r["method"]]["seeds"][0]
        a, b = rec["final_items"][0], seq["final_items"][0]
        (mc,) = r["mcnemar"]
        assert (mc["n10"], mc["n01"]) == (sum(x and not y for x, y in zip(a, b)),
                                          sum(y and not x for x, y in zip(a, b)))
        assert r["diffs"] == [pytest.approx(100 * (rec["metrics"]["task0_final"] - seq["metrics"]["task0_final"]))]
        assert r["ci95"] is None and r["n_seeds"] == 1
        assert r["verdict"] == "not distinguishable" and not r["distinguishable"]  # one seed: never a claim
    assert "Paired differences" in (root / "r1" / "summary.md").read_text()


def _fake_results(task0: dict[str, list[float]]) -> dict:
    methods = {}
    for name, vals in task0.items():
        seeds = [{"seed": s, "metrics": {"task0_final": v, "new_task_accuracy": 0.5}, "final_items": None}
                 for s, v in enumerate(vals)]
        methods[name] = {"status": "ok", "seeds": seeds}
    return {"methods": methods}


def test_paired_comparisons_verdicts_and_holm():
    res = _fake_results({"seq": [0.30, 0.40, 0.35, 0.32], "good": [0.50, 0.61, 0.54, 0.52],
                         "tie": [0.31, 0.38, 0.37, 0.30]})
    rows = {(r["method"], r["baseline"], r["metric"]): r for r in C.paired_comparisons(res)}
    good, tie = rows[("good", "seq", "task0_final")], rows[("tie", "seq", "task0_final")]
    assert good["diffs"] == pytest.approx([20.0, 21.0, 19.0, 20.0])
    assert good["diff"] == pytest.approx(20.0) and good["verdict"] == "distinguishable" and good["distinguishable"]
    lo, hi = good["ci95"]
    assert lo == pytest.approx(20.0 - 3.182446305284263 * (2 / 3) ** 0.5 / 2) and hi > 20.0
    assert tie["verdict"] == "not distinguishable"
    # Holm over the two comparisons with seq: the smaller p doubled, the larger kept (monotone)
    assert good["p"] < tie["p"]
    assert good["p_holm"] == pytest.approx(2 * good["p"]) and tie["p_holm"] == pytest.approx(max(2 * good["p"], tie["p"]))
    assert ("good", "tie", "task0_final") in rows  # the best two against each other
    # equal new-task accuracy everywhere: zero differences, never distinguishable
    assert rows[("good", "seq", "new_task_accuracy")]["verdict"] == "not distinguishable"


def test_budgets_and_gain_columns(micro_run):
    root, results, _ = micro_run
    res = json.loads((root / "r1" / "results.json").read_text())
    m = {name: res["methods"][name]["seeds"][0]["metrics"] for name in E2E_METHODS}
    seq = m["seq"]
    assert (seq["extra_train_steps"], seq["old_examples_used"], seq["stored_state_mb"]) == (0, 0, 0.0)
    # replay keeps the whole Task-0 training set as memory (micro preset: one later task)
    from benchmarks import biography

    sc = biography.build_scenario("micro", str(root / "cache"), 0)
    n0 = sum(int(b["input_ids"].shape[0]) for b in sc.tasks[0].train)
    assert m["replay"]["old_examples_used"] == n0
    # its stored state at the end: the memory of every finished task (ready for a next one)
    assert m["replay"]["stored_state_mb"] == pytest.approx(
        sum(v.numel() * v.element_size() for t in sc.tasks for b in t.train for v in b.values()) / 2**20)
    assert m["replay"]["extra_train_steps"] == 0
    plan = res["methods"]["planned"]["seeds"][0]["method_report"]
    probe = res["methods"]["planned"]["hyperparameters"].get("probe_steps") or min(20, res["scenario"]["steps_per_task"])
    probed = sum(1 for c in plan["candidates"] if c["freeze_bottom"] or c["protect"] or c["ewc_scale"])
    assert m["planned"]["extra_train_steps"] == 1 + (1 + probed) * probe > 1  # as plan() counts them
    for name in E2E_METHODS:
        rec = res["methods"][name]["seeds"][0]
        R, N = rec["acc_matrix"], rec["nll_matrix"]
        assert m[name]["plasticity_gain"] == pytest.approx(R[1][1] - R[0][1])
        assert m[name]["task0_nll_final"] == N[-1][0] and N[-1][0] > 0
    md = (root / "r1" / "summary.md").read_text()
    for col in ("new-task gain", "Task-0 NLL", "extra steps", "old examples", "state (MiB)", "wall (s)"):
        assert col in md


def test_a_combination_counts_its_parts_budgets(micro_run):
    root, _, _ = micro_run
    from benchmarks import biography

    sc = biography.build_scenario("micro", str(root / "cache"), 0)
    model = sc.model_factory()
    method = M.get("freeze-bottom+replay")
    ctx = M.RunContext(model=model, scenario=sc, device=torch.device("cpu"), seed=0,
                       hp=C._method_hp(method, {}))
    ctx.optimizer = method.setup(model, torch.optim.AdamW(model.parameters()), ctx)
    method.after_task(ctx, 0)
    n0 = sum(int(b["input_ids"].shape[0]) for b in sc.tasks[0].train)
    assert ctx.budget["old_examples"] == n0  # the replay part's memory, counted in the combination
    memory = sum(v.numel() * v.element_size() for b in sc.tasks[0].train for v in b.values())
    assert memory > 0 and C.stored_state_mb(ctx.state) == pytest.approx(memory / 2**20)


def test_describe_states_the_scored_items_without_training(micro_run, capsys):
    root, results, _ = micro_run
    assert C.main(["--describe", "--preset", "micro", "--methods", "seq,ewc", "--seeds", "2"]) is None
    d = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in d["tasks"]] == ["task0", "task1"]
    assert d["methods"] == ["seq", "ewc"] and d["seeds"] == [0, 1] and d["estimated_wall_s"] > 0
    # the counts are the items the run really scores, and results.json carries them
    res = json.loads((root / "r1" / "results.json").read_text())
    assert res["tasks"] == d["tasks"]
    items = res["methods"]["seq"]["seeds"][0]["final_items"]
    assert [t["eval_items"] for t in d["tasks"]] == [len(x) for x in items]
    sc = __import__("benchmarks.biography", fromlist=["x"]).build_scenario("micro", str(root / "cache"), 0)
    assert [t["train_examples"] for t in d["tasks"]] == [sum(int(b["input_ids"].shape[0]) for b in t.train) for t in sc.tasks]


def test_smollm2_describe_needs_no_model():
    from benchmarks import smollm2

    d = smollm2.describe("micro")
    cfg = smollm2.resolve_config("micro")
    assert [t["name"] for t in d["tasks"]] == list(cfg.tasks)
    assert all(t["eval_items"] == len(x.evals["main"]) for t, x in zip(d["tasks"], smollm2.generate_tasks(cfg, 0)))
    assert {g["name"] for g in d["general"]} == {"stdlib_nll", "fact_probe"}


def test_caches_warmed_in_workers_equal_those_built_in_process(tmp_path):
    """Several seeds' Task-0 models and null controls are built in parallel worker processes;
    the parent must then load exactly what it would have built itself."""
    warm = C.BenchConfig(preset="micro", methods=["seq"], seeds=2, workers=2, cache_dir=str(tmp_path / "warm"))
    cold = C.BenchConfig(preset="micro", methods=["seq"], seeds=2, workers=1, cache_dir=str(tmp_path / "cold"))
    cpu = torch.device("cpu")
    C._warm_caches(warm, [0, 1], cpu)
    assert len(list((tmp_path / "warm").rglob("null-*.safetensors"))) == 2  # both seeds, in workers
    C._warm_caches(cold, [0, 1], cpu)  # one worker: nothing is built ahead
    assert not (tmp_path / "cold").exists() or not list((tmp_path / "cold").rglob("*.safetensors"))
    for seed in (0, 1):
        _, a = C._prepare_seed(warm, seed, cpu)
        sc, b = C._prepare_seed(cold, seed, cpu)
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
        na = C.null_model(sc, warm.cache_dir, seed, cpu, a)
        nb = C.null_model(sc, cold.cache_dir, seed, cpu, b)
        assert all(torch.equal(p, q) for p, q in zip(na.state_dict().values(), nb.state_dict().values()))


def test_worker_processes_show_no_progress_bars():
    """A worker's bars are hidden even when the bar asks to be shown (TQDM_DISABLE is read at
    tqdm's import, before the worker initializer runs)."""
    import subprocess
    import sys

    code = ("import transformers, tqdm.auto\n"
            "from benchmarks.compare import _quiet_tqdm\n"
            "_quiet_tqdm(); _quiet_tqdm()\n"
            "print(tqdm.auto.tqdm(range(3), disable=False).disable, tqdm.auto.tqdm(range(3)).disable)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.stdout.split() == ["True", "True"] and not out.stderr.strip().count("it/s")


def test_a_part_that_appends_rows_runs_its_batch_hook_last(monkeypatch):
    appended = {"input_ids": torch.full((1, 3), 7)}
    def append(ctx, b):
        return {"input_ids": torch.cat([b["input_ids"], appended["input_ids"]])}
    def swap_last(ctx, b):
        ids = b["input_ids"].clone()
        ids[-1] = 5
        return {"input_ids": ids}
    monkeypatch.setitem(M.METHODS, "_app", M.Method(name="_app", help="", batch=append, appends_rows=True))
    monkeypatch.setitem(M.METHODS, "_swap", M.Method(name="_swap", help="", batch=swap_last))
    for name in ("_app+_swap", "_swap+_app"):
        method = M.get(name)
        ctx = M.RunContext(model=torch.nn.Linear(1, 1), scenario=None, device=torch.device("cpu"), seed=0,
                           hp={})
        out = method.batch(ctx, {"input_ids": torch.zeros(2, 3, dtype=torch.long)})
        assert out["input_ids"][-1].tolist() == [7, 7, 7] and out["input_ids"][1].tolist() == [5, 5, 5]
        assert method.appends_rows

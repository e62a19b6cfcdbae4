"""Issue 7's driver (scripts/reproduce_fmnist.py) and plan (scripts/reproduce_fmnist_plan.py), on CPU.

The end-to-end test runs the ``smoke`` group as 2 worker processes ("GPUs") on tiny synthetic data; the
analysis and long-run groups, which take a minute on 2 cores, carry the ``slow`` marker.
"""
import json
import sys
import tarfile
from pathlib import Path

import pytest

from mita.engine.runner import CONFIG_DIR, build_model_from_config, compose

sys.path.insert(0, str(CONFIG_DIR.parent / "scripts"))
import reproduce_fmnist  # noqa: E402
import reproduce_fmnist_plan as plan  # noqa: E402

sys.path.pop(0)

REAL_GROUPS = [name for name in plan.GROUPS if not name.startswith("smoke")]
TRAIN_RUNS = [(g, r) for g in REAL_GROUPS for r in plan.GROUPS[g] if r.kind in ("train", "fit", "finetune")]


def _compose_run(run, tmp_path, *extra):
    """train.py's config of a planned run, as the driver composes it (run folder and data root in tmp_path)."""
    spec = {"overrides": run.overrides, "seed": run.seed, "epochs": run.epochs, "run_dir": str(tmp_path),
            "data_root": str(tmp_path)}
    return compose("train", [*reproduce_fmnist.run_overrides(spec), *extra])


@pytest.mark.parametrize("group,run", TRAIN_RUNS, ids=[f"{g}-{r.name}" for g, r in TRAIN_RUNS])
def test_every_planned_run_composes(group, run, tmp_path):
    cfg = _compose_run(run, tmp_path)
    assert cfg.trainer.epochs == run.epochs and cfg.seed == run.seed and cfg.data.root == str(tmp_path)
    assert cfg.attention.name in ("standard", "agent", "moba", "topk", "linear", "mita")
    if run.kind == "fit":
        assert cfg.data.img_size == 112 and cfg.model.kwargs.patch_size == 2
    else:
        assert cfg.experiment_name == "fmnist_repro" and cfg.data.img_size == 28


@pytest.mark.parametrize("group,run", TRAIN_RUNS, ids=[f"{g}-{r.name}" for g, r in TRAIN_RUNS])
def test_every_planned_model_trains_and_goes_through_the_evaluation(group, run, tmp_path):
    """What each run's GPU call does to its model, at depth 1 on CPU, before device time is spent on it: one
    training step, the evaluation's FLOP count (count_flops under no_grad, with FlopCounterMode's module
    tracker) and the no_grad bf16 forward of the inference timing. The learned landmarks once trained 16
    epochs on the GPU and then failed in the FLOP count."""
    import torch

    from mita.utils.flops import count_flops

    cfg = _compose_run(run, tmp_path, "++model.kwargs.depth=1")
    model = build_model_from_config(cfg.model, cfg.attention, load_pretrained=False)
    size = int(cfg.data.img_size)
    x = torch.randn(2, int(cfg.model.in_chans), size, size)  # [B, C, H, W]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert count_flops(model, x[:1]) > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.eval()(x).shape == (2, 10)


def test_recipe_values():
    cfg = compose("train", ["experiment=fmnist_repro"])
    assert cfg.trainer.epochs == plan.EPOCHS == 16 and cfg.trainer.eval_every == plan.EVAL_EVERY
    assert cfg.model.arch == "deit_tiny_patch16_224" and cfg.model.kwargs.patch_size == 2
    assert (cfg.attention.num_landmarks, cfg.attention.topk, cfg.data.img_size) == (25, 25, 28)
    assert cfg.trainer.precision == "bf16" and cfg.logger.name == "none"


@pytest.mark.parametrize("overrides,tokens", [([], 197), (["attention.num_landmarks=100", "attention.topk=100"], 3137)])
def test_long_recipe_builds(overrides, tokens):
    import torch

    name = "fmnist_repro_long" if tokens > 197 else "fmnist_repro"
    cfg = compose("train", [f"experiment={name}", "attention=mita", "++model.kwargs.depth=1", *overrides])
    model = build_model_from_config(cfg.model, cfg.attention)
    assert model.patch_embed.num_patches + 1 == tokens
    with torch.no_grad():
        assert model(torch.randn(1, 1, cfg.data.img_size, cfg.data.img_size)).shape == (1, 10)


def test_plan_groups_fit_one_call():
    names = [r.name for g in REAL_GROUPS for r in plan.GROUPS[g]]
    assert len(names) == len(set(names))  # run folders never collide across calls
    for group in REAL_GROUPS:
        runs = plan.GROUPS[group]
        assert len(runs) <= 2 * plan.GPUS
        if all(r.kind != "fit" for r in runs):
            assert plan.makespan(runs, plan.GPUS) <= plan.BUDGET_S, group
    # each call of the plan names existing groups, and every real group is in one call
    called = [g for calls, _ in plan.CALLS for g in calls.split(",")]
    assert sorted(called) == sorted(REAL_GROUPS)
    # the main table: 9 attentions x 2 seeds; the m x k grid: 15 runs + main1's MiTA seed 0, and 36 x 36's seed 1
    main = [r for g in ("main1", "main2") for r in plan.GROUPS[g] if r.name.endswith(("_s0", "_s1"))]
    assert len(main) == 18
    assert len([r for g in REAL_GROUPS for r in plan.GROUPS[g] if r.name.startswith("mk_m")]) == 16
    assert {(r.name, r.seed) for r in plan.GROUPS["mk2"] if r.seed} == {("mk_m36_k36_s1", 1)}
    exported = {r.name for g in ("main1", "main2") for r in plan.GROUPS[g] if r.export}
    assert exported == set(plan.EXPORT_RUNS) and set(plan.EXPORTS) == {"mita", "agent49", "standard"}


def test_shard_splits_and_rejects():
    runs = plan.runs_of("main1")
    parts = [plan.shard(runs, f"{i}/2") for i in (1, 2)]
    assert sorted(r.name for p in parts for r in p) == sorted(r.name for r in runs)
    assert all(plan.makespan(p, 4) <= plan.BUDGET_S for p in parts)
    for bad in ("0/2", "3/2", "x"):
        with pytest.raises(ValueError, match="--shard"):
            plan.shard(runs, bad)
    with pytest.raises(ValueError, match="unknown group"):
        plan.runs_of("main9")


def test_driver_rejects_bad_arguments(tmp_path, capsys):
    for argv in (["--plan", "nope", "--out", str(tmp_path), "--smoke"],
                 ["--plan", "main1", "--out", str(tmp_path), "--data-root", str(tmp_path / "missing")],
                 ["--plan", "smoke", "--out", str(tmp_path), "--smoke", "--gpus", "0"]):
        with pytest.raises(SystemExit) as err:
            reproduce_fmnist.main(argv)
        assert err.value.code == 2


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_driver_smoke_end_to_end(tmp_path):
    out = tmp_path / "out"
    argv = ["--plan", "smoke", "--out", str(out), "--work", str(tmp_path / "work"), "--smoke", "--gpus", "2",
            "--budget-s", "300"]
    assert reproduce_fmnist.main(argv) == 1  # smoke_too_long is skipped, which the exit status says
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.json", "driver.log", "runs.tar.gz", "smoke_mita_fp16.pth", "smoke_standard_fp16.pth"])
    summary = _summary(out)
    runs = summary["runs"]
    assert runs["smoke_too_long"]["status"] == "skipped" and "left" in runs["smoke_too_long"]["reason"]
    assert summary["not_ok"] == ["smoke_too_long"]
    for name, seed in (("smoke_mita", 0), ("smoke_standard", 1)):
        run = runs[name]
        assert run["status"] == "ok" and run["seed"] == seed and run["epochs"] == 1 and run["card"] == "cpu"
        assert run["train_command"].startswith("python train.py experiment=fmnist_repro")
        assert f"seed={seed}" in run["train_command"] and run["eval_command"].startswith("python eval.py")
        # the commands name the run folder as runs.tar.gz holds it, not the machine's work folder
        assert f"run_dir=runs/{name}" in run["train_command"]
        assert f"ckpt=runs/{name}/checkpoint.pth" in run["eval_command"]
        for key in ("top1", "params", "macs", "train_images_per_s", "infer_images_per_s", "wall_s"):
            assert run[key] is not None and run[key] >= 0, key
    assert str(tmp_path) not in json.dumps(summary)
    # the two ran at the same time, one per "GPU"
    assert {runs["smoke_mita"]["gpu"], runs["smoke_standard"]["gpu"]} == {0, 1}
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
        texts = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()
                 if m.isfile() and not m.name.endswith(".png")}
    assert {"runs/smoke_mita/log.jsonl", "runs/smoke_mita/config.yaml", "runs/smoke_mita/result.json",
            "runs/smoke_standard/eval.json"} <= names
    assert not any(n.endswith(".pth") for n in names)
    # the raw files (config, spec, worker log) hold the run folders as runs/NAME too, no machine path
    assert "run_dir: runs/smoke_mita" in texts["runs/smoke_mita/config.yaml"]
    assert not [n for n, text in texts.items() if str(tmp_path) in text or str(reproduce_fmnist.REPO) in text]


def test_driver_stops_a_run_at_the_budget(tmp_path):
    """A run still going when the budget ends is stopped and reported as killed; nothing else starts."""
    out = tmp_path / "out"
    argv = ["--plan", "smoke", "--out", str(out), "--work", str(tmp_path / "work"), "--smoke", "--gpus", "1",
            "--budget-s", "3"]
    assert reproduce_fmnist.main(argv) == 1
    runs = _summary(out)["runs"]
    statuses = sorted(r["status"] for r in runs.values())
    assert statuses == ["killed", "skipped", "skipped"], runs
    assert (out / "runs.tar.gz").is_file() and not list(out.glob("*.pth"))


@pytest.mark.slow
def test_driver_analysis_and_long_groups(tmp_path):
    first = tmp_path / "first"
    assert reproduce_fmnist.main(["--plan", "smoke", "--out", str(first), "--work", str(tmp_path / "w1"),
                                  "--smoke", "--gpus", "2", "--budget-s", "300"]) == 1
    out = tmp_path / "out"
    argv = ["--plan", "smoke_analysis,smoke_long", "--out", str(out), "--work", str(tmp_path / "w2"), "--smoke",
            "--gpus", "4", "--budget-s", "300", "--ckpt-dir", str(first)]
    assert reproduce_fmnist.main(argv) == 0
    summary = _summary(out)
    assert all(r["status"] == "ok" for r in summary["runs"].values()), summary["runs"]
    assert summary["fit"]["train_images"] >= 8 and set(summary["probes"]) == {"smoke_fit_a_probe", "smoke_fit_b_probe"}
    assert summary["runs"]["smoke_finetune"]["zero_shot_top1"] is not None
    assert len(summary["runs"]["smoke_swap"]["swap"]["labels"]) == 2
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"runs/smoke_figures/analysis/pruning.png", "runs/smoke_mk_grid/analysis/mk_grid.json",
            "runs/smoke_swap/analysis/swap.csv", "runs/smoke_finetune/zero_shot.json"} <= names


@pytest.mark.slow
def test_long_probes_take_one_gpu_in_turn(tmp_path):
    out = tmp_path / "out"
    argv = ["--plan", "smoke_long", "--out", str(out), "--work", str(tmp_path / "w"), "--smoke", "--gpus", "1",
            "--slots", "2", "--budget-s", "300"]
    assert reproduce_fmnist.main(argv) == 0
    log = (out / "driver.log").read_text()
    # the second probe starts once the first has ended; the sized runs then share the GPU
    assert log.index("smoke_fit_a_probe ok") < log.index("started smoke_fit_b_probe")
    summary = _summary(out)
    assert summary["fit"]["runs_per_gpu"] == 2 and set(summary["fit"]["train_images_per_s"]) == {
        "smoke_fit_a_probe", "smoke_fit_b_probe"}
    assert all(r["status"] == "ok" for r in summary["runs"].values())


def test_generalisation_needs_its_checkpoints(tmp_path):
    out = tmp_path / "out"
    argv = ["--plan", "smoke_analysis", "--out", str(out), "--work", str(tmp_path / "w"), "--smoke",
            "--gpus", "1", "--budget-s", "60", "--ckpt-dir", str(tmp_path)]
    assert reproduce_fmnist.main(argv) == 1
    runs = _summary(out)["runs"]
    assert all(r["status"] == "failed" and "lacks" in r["error"] for r in runs.values())


def test_checkpoint_folder_inside_the_repo_is_recorded_relative(tmp_path):
    # the analyses write their checkpoint's path into their JSON: a folder of the repository stays relative
    out = tmp_path / "out"
    inside = reproduce_fmnist.REPO / ".ckpt" / "no-such-exports"
    argv = ["--plan", "smoke_analysis", "--only", "smoke_figures", "--out", str(out), "--work", str(tmp_path / "w"),
            "--smoke", "--gpus", "1", "--budget-s", "60", "--ckpt-dir", str(inside)]
    assert reproduce_fmnist.main(argv) == 1
    error = _summary(out)["runs"]["smoke_figures"]["error"]
    assert "'.ckpt/no-such-exports'" in error and str(reproduce_fmnist.REPO) not in error


def test_slowdown_of_shared_gpus():
    assert plan.slowdown(1) == 1.0
    # between measured counts: the largest measured count's slowdown, scaled by the extra runs
    known = max(plan.SLOWDOWN)
    assert plan.slowdown(known + 1) == pytest.approx(plan.SLOWDOWN[known] * (known + 1) / known)
    with pytest.raises(ValueError, match="slots"):
        plan.slowdown(0)


def test_driver_slots_share_one_gpu_and_only_selects(tmp_path):
    out = tmp_path / "out"
    argv = ["--plan", "smoke", "--only", "smoke_mita,smoke_standard", "--out", str(out), "--work",
            str(tmp_path / "work"), "--smoke", "--gpus", "1", "--slots", "2", "--budget-s", "300"]
    assert reproduce_fmnist.main(argv) == 0
    summary = _summary(out)
    assert set(summary["runs"]) == {"smoke_mita", "smoke_standard"}
    assert summary["setup"]["slots"] == 2 and summary["setup"]["slowdown"] == plan.slowdown(2)
    assert all(r["status"] == "ok" and r["gpu"] == 0 for r in summary["runs"].values())


@pytest.mark.parametrize("extra", [["--only", "nope"], ["--slots", "0"], ["--slowdown", "0"]])
def test_driver_rejects_bad_slots_and_selections(tmp_path, extra):
    with pytest.raises(SystemExit) as err:
        reproduce_fmnist.main(["--plan", "smoke", "--out", str(tmp_path), "--smoke", *extra])
    assert err.value.code == 2


def _driver(tmp_path, budget_s=100.0, gpus=1, smoke=True):
    import argparse

    args = argparse.Namespace(budget_s=budget_s, slots=2, slowdown=None, work=str(tmp_path), smoke=smoke,
                              out=str(tmp_path), gpus=gpus)
    return reproduce_fmnist.Driver(args, [])


def _job(driver, name, epoch_times, epochs=10, gpu=0):
    job = reproduce_fmnist.Job(plan.Run(name, epochs=epochs, estimate_s=1.0))
    job.started, job.gpu = driver.start, gpu
    run_dir = Path(driver.work) / "runs" / name
    run_dir.mkdir(parents=True)
    lines = [json.dumps({"epoch": i, "train_images_per_s": 1.0, "epoch_time_s": t}) for i, t in enumerate(epoch_times)]
    (run_dir / "log.jsonl").write_text("".join(line + "\n" for line in lines))
    return job


def test_driver_stops_early_one_run_projected_past_the_budget(tmp_path, monkeypatch):
    stopped = []
    monkeypatch.setattr(reproduce_fmnist, "_stop", stopped.append)
    driver = _driver(tmp_path)
    # 2 of 10 epochs at 30 s: 240 s more do not fit the 100 s budget; 20 s epochs do not either, but only the
    # run furthest past is stopped on a GPU in one check; the one-epoch run has no estimate yet
    slow, slower = _job(driver, "slow", [50.0, 20.0]), _job(driver, "slower", [50.0, 30.0])
    fresh, fits = _job(driver, "fresh", [500.0]), _job(driver, "fits", [30.0, 5.0], gpu=1)
    assert driver._projection(fresh) is None and driver._projection(fits) < 0
    assert driver._stop_overrunning([slow, slower, fresh, fits]) == [slower] and stopped == [slower.proc]
    entry = driver.summary["runs"]["slower"]
    assert entry["status"] == "killed" and "projected to end" in entry["reason"] and entry["epochs_done"] == 2
    # once the GPU's occupancy changed, only epochs logged after it count: none yet, so no estimate
    driver._occupancy_changed(0, [slow, fresh])
    assert slow.epochs_at_change == 2 and driver._projection(slow) is None
    (Path(driver.work) / "runs" / "slow" / "log.jsonl").open("a").write(
        json.dumps({"epoch": 2, "train_images_per_s": 1.0, "epoch_time_s": 4.0}) + "\n")
    assert driver._projection(slow) < 0  # 7 epochs at 4 s fit


def test_single_gpu_plan_covers_every_run_inside_the_budget(tmp_path):
    stages = plan.single_gpu_calls()
    assert [name for name, _ in stages] == ["long", "train", "exports then generalisation"]
    planned = [r.name for _, calls in stages for call in calls for r in call.runs]
    every = [r.name for g in REAL_GROUPS for r in plan.GROUPS[g]]
    assert sorted(planned) == sorted(every)  # each run once
    for _, calls in stages:
        for call in calls:
            assert 1 <= call.slots <= 3 and "--only" in call.command() and "--card h200" in call.command()
            if all(r.kind == "train" for r in call.runs):
                assert call.span() <= plan.BUDGET_1GPU_S, call.command()
    # the exports are made in the stage that ends with the generalisation call that reads them
    exports, generalisation = stages[2][1][:-1], stages[2][1][-1]
    assert set(plan.EXPORT_RUNS) <= {r.name for c in exports for r in c.runs}
    assert all(any(r.name in plan.EXPORT_RUNS for r in c.runs) for c in exports)
    assert {r.name for r in generalisation.runs} == {r.name for r in plan.GROUPS["generalisation"]}
    assert generalisation.command().endswith("--ckpt-dir .ckpt/issue7")
    # runs already done are left out, except the exporting ones, whose weights must be made again
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"runs": {"mita_s1": {"status": "ok"}, "mita_s0": {"status": "ok"},
                                            "pool_1d": {"status": "killed"}}}))
    done = plan.done_runs([str(summary)])
    assert done == ["mita_s0", "mita_s1"]
    left = [r.name for _, calls in plan.single_gpu_calls(done) for c in calls for r in c.runs]
    assert "mita_s1" not in left and "mita_s0" in left and "pool_1d" in left


def test_single_gpu_plan_order_and_what_is_done():
    stages = dict(plan.single_gpu_calls())
    # the main table's runs are packed before the other ablations, and those before the m x k grid
    lowest = [min(plan._tier(r) for r in c.runs) for c in stages["train"]]
    assert lowest == sorted(lowest) and lowest[0] == 0 and lowest[-1] == 2
    gen = [r.name for r in plan.GROUPS["generalisation"]]
    # with the generalisation group done, no exports stage: the exporting runs, done, are left out too
    done = [*gen, *plan.EXPORT_RUNS, *(r.name for r in plan.GROUPS["long"])]
    stages = dict(plan.single_gpu_calls(done))
    assert set(stages) == {"train"}
    assert not {r.name for c in stages["train"] for r in c.runs} & set(plan.EXPORT_RUNS)
    # only the fine-tuning jobs left: only the standard checkpoint is made again
    left = [n for n in gen if not n.startswith("finetune")]
    stages = dict(plan.single_gpu_calls([*left, *plan.EXPORT_RUNS]))
    exports, generalisation = stages["exports then generalisation"][:-1], stages["exports then generalisation"][-1]
    assert {r.name for c in exports for r in c.runs if r.export} == {"standard_s1"}
    assert all(r.name.startswith("finetune") for r in generalisation.runs)
    assert not {"mita_s0", "agent49_s0"} & {r.name for c in stages["train"] for r in c.runs}


def test_h200_estimates():
    run = plan.GROUPS["main1"][0]
    assert run.estimate("h200") < run.estimate("h100")  # measured faster on the H200 than the H100's slowest
    with pytest.raises(ValueError, match="card"):
        run.estimate("a100")
    # token-merging landmarks train slower than the other extractors (measured beside another run): the
    # single-GPU plan gives pool_tome a call of its own rather than a pair that would overrun the budget
    pools = {r.name: r for r in plan.GROUPS["ablations"] if r.name.startswith("pool_")}
    for card in ("h100", "h200"):
        assert pools["pool_tome"].estimate(card) > pools["pool_conv"].estimate(card)
    calls = [c for _, cs in plan.single_gpu_calls() for c in cs]
    assert [len(c.runs) for c in calls if "pool_tome" in {r.name for r in c.runs}] == [1]


def test_single_gpu_sessions_fit_the_device_time():
    stages = plan.single_gpu_calls()
    grouped = plan.sessions(stages)
    numbers = [n for session in grouped for n, _, _ in session]
    assert numbers == list(range(1, len(numbers) + 1))  # numbered in the order they are sent
    sent = sorted(id(c) for session in grouped for _, _, c in session)
    assert sent == sorted(id(c) for _, calls in stages for c in calls)  # every call once
    for session in grouped:
        held = plan.START_S + sum(plan._device_s(c) for _, _, c in session)
        assert session and held <= plan.SHARED_MARGIN * plan.SESSION_DEVICE_S
    # the exports and the generalisation call that reads them share one session
    where = {stage: {i for i, s in enumerate(grouped) for _, st, _ in s if st == stage} for stage, _ in stages}
    assert len(where["exports then generalisation"]) == 1
    # the plan's text names the sessions
    text = plan.describe_single_gpu()
    assert text.count("\nsession ") == len(grouped) and "call 1 [long]" in text
    with pytest.raises(ValueError, match="device time"):
        plan.sessions(stages, session_s=300.0)


def test_spare_time_names_the_next_sessions_longest_run_alone():
    grouped = plan.sessions(plan.single_gpu_calls())
    trains = [i for i in range(len(grouped) - 1) if grouped[i + 1][0][1] == "train"]
    assert trains, "the full plan has sessions followed by training calls"
    needed, run = plan.spare_run(grouped[trains[0] + 1])
    first = grouped[trains[0] + 1][0][2]
    assert run in first.runs and run.estimate("h200") == max(r.estimate("h200") for r in first.runs)
    assert needed == pytest.approx(plan.Call([run], 1).span() + plan.SPARE_MARGIN_S)
    assert needed < plan.Call(first.runs, first.slots).span()  # alone it takes less than its pair
    # nothing after the last session; the long call and the exports stage never lend a run
    assert plan.spare_run([]) is None
    long = [(1, "long", plan.Call(list(plan.GROUPS["long"]), 1))]
    assert plan.spare_run(long) is None
    text = plan.describe_single_gpu()
    line = next(x for x in text.splitlines() if x.startswith("  then, if at least"))
    assert f"--only {run.name} --slots 1 --card h200 --budget-s LEFT" in text
    assert f"LEFT = that less {plan.SPARE_MARGIN_S:.0f}" in line


def test_strip_paths_leaves_longer_names_alone(tmp_path):
    work = str(tmp_path / "w")
    text = f"{work}/runs/a {work} {work}2/x {reproduce_fmnist.REPO}/.ckpt/a.pth"
    assert reproduce_fmnist._strip_paths(text, work) == f"runs/a . {work}2/x .ckpt/a.pth"


def test_probes_run_alone_on_their_gpu():
    def job(name, gpu=None, probe=False):
        j = reproduce_fmnist.Job(plan.Run(name, estimate_s=1.0), probe=probe)
        j.gpu = gpu
        return j

    probe, train = job("a", probe=True), job("b")
    # a probe waits for a GPU where nothing runs; beside a probe nothing starts
    assert reproduce_fmnist._pick_gpu(probe, [0, 1], [job("x", gpu=0)]) == 1
    assert reproduce_fmnist._pick_gpu(probe, [0], [job("x", gpu=0)]) is None
    assert reproduce_fmnist._pick_gpu(train, [0, 0], [job("p", gpu=0, probe=True)]) is None
    assert reproduce_fmnist._pick_gpu(train, [0, 1], [job("p", gpu=0, probe=True)]) == 1
    assert reproduce_fmnist._pick_gpu(train, [0], [job("x", gpu=0)]) == 0


def _probe(name, rate, val_rate):
    return {"name": f"{name}_probe", "status": "ok", "train_images_per_s": rate,
            "last_record": {"val_images_per_s": val_rate}}


@pytest.mark.parametrize("gpus", [1, 3])
def test_long_runs_sized_by_the_sum_of_their_probed_times(tmp_path, gpus):
    driver = _driver(tmp_path, budget_s=600.0, gpus=gpus, smoke=False)
    runs = [plan.Run(n, kind="fit", epochs=4) for n in ("fast", "slow", "slower")]
    probes = {"fast": _probe("fast", 500.0, 2000.0), "slow": _probe("slow", 250.0, 1000.0),
              "slower": _probe("slower", 200.0, 1000.0)}
    jobs = driver._sized(runs, probes)
    fit = driver.summary["fit"]
    images = fit["train_images"]
    # the group's order (its baseline first), each estimated at its own time alone
    assert [j.run.name for j in jobs] == ["fast", "slow", "slower"] and images % 1000 == 0
    assert jobs[0].estimate < jobs[1].estimate < jobs[2].estimate <= fit["estimate_s"]
    assert all(j.extra == [f"data.max_train_samples={images}"] for j in jobs)
    # one GPU: the three runs one after another; three: the slowest alone
    per_image = 4 / 500 + 4 / 250 + 4 / 200 if gpus == 1 else 4 / 200
    val = (2 * plan.VAL_IMAGES + 25 * 256) / 1000
    evals = val + (2 * plan.VAL_IMAGES + 25 * 256) / 2000 + val if gpus == 1 else val
    usable = fit["left_s"] - (3 if gpus == 1 else 1) * plan.OVERHEAD_S - evals - 20.0
    assert images == min(plan.TRAIN_IMAGES, int(usable / per_image // 1000 * 1000))
    assert fit["estimate_s"] <= fit["left_s"] - 20.0 and fit["runs_per_gpu"] == (3 if gpus == 1 else 1)
    # a probe that failed: its run is skipped, the others still sized
    probes["slow"] = {"status": "failed"}
    assert [j.run.name for j in driver._sized(runs, probes)] == ["fast", "slower"]
    assert driver.summary["runs"]["slow"]["status"] == "skipped"

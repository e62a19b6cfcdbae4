"""scripts/collect_repro.py on synthetic summary.json files written in the driver's format (reproduce_fmnist.py)."""
import json
import sys

import pytest

from mita.engine.runner import CONFIG_DIR

sys.path.insert(0, str(CONFIG_DIR.parent / "scripts"))
import collect_repro  # noqa: E402

sys.path.pop(0)


def _ok(name, seed, top1, card="NVIDIA H100 80GB HBM3", wall=400.0, **extra):
    """A run entry as Driver.finish records it: the worker's result.json plus status, estimate, gpu, wall_s."""
    entry = {"status": "ok", "estimate_s": 471.0, "name": name, "kind": "train", "seed": seed, "epochs": 16,
             "probe": False, "card": card, "torch": "2.11.0", "train_command": f"python train.py seed={seed}",
             "train_s": wall - 20, "peak_mem_gib": 3.5, "last_record": {}, "epochs_done": 16,
             "train_images_per_s": 3000.0, "epoch_time_s": 20.0, "last_val_acc1": top1, "best_acc1": top1,
             "eval_command": "python eval.py", "top1": top1, "top5": 99.0, "params": 5_500_000,
             "macs": 1_100_000_000, "eval_images_per_s": 6000.0, "infer_images_per_s": 9000.0,
             "infer_batch": 256, "infer_precision": "bf16", "wall_s": wall, "gpu": 0}
    entry.update(extra)
    return entry


def _write(path, plan, runs, fit=None, probes=None):
    summary = {"runs": runs, "fit": fit, "elapsed_s": 555.0, "probes": probes or {},
               "setup": {"argv": [], "plan": plan, "shard": None, "gpus": 8, "budget_s": 560.0,
                         "recipe": ["experiment=fmnist_repro"], "epochs": 16, "runs": sorted(runs)},
               "exports": {}, "not_ok": sorted(n for n, r in runs.items() if r["status"] != "ok")}
    path.write_text(json.dumps(summary))
    return str(path)


@pytest.fixture
def summaries(tmp_path):
    main1 = _write(tmp_path / "main1.json", "main1", {
        "mita_s0": _ok("mita_s0", 0, 90.0),
        "mita_s1": _ok("mita_s1", 1, 91.0, wall=410.0),
        "standard_s0": _ok("standard_s0", 0, 92.5),
        # killed at the budget: the driver adds the log's stats, which must never reach a table
        "mita_dwc_s0": {"status": "killed", "estimate_s": 480.0, "epochs_done": 9, "train_images_per_s": 2100.0,
                        "epoch_time_s": 28.0, "last_val_acc1": 77.7, "best_acc1": 77.7, "gpu": 3, "wall_s": 560.2},
        "mita_dwc_s1": _ok("mita_dwc_s1", 1, 93.25),
        "linear_s0": {"status": "skipped", "estimate_s": 243.0, "reason": "estimated 243 s, 12 s left"},
    })
    ablations = _write(tmp_path / "ablations.json", "ablations", {
        "top2": _ok("top2", 0, 88.8),
        "pool_random": {"status": "skipped", "estimate_s": 471.0, "reason": "the budget ran out before it could start"},
        "mk_m9_k9": _ok("mk_m9_k9", 0, 85.5),
    })
    mk1 = _write(tmp_path / "mk1.json", "mk1", {"mk_m9_k16": _ok("mk_m9_k16", 0, 86.0, card="NVIDIA H200")})
    long = _write(tmp_path / "long.json", "generalisation,long", {
        "long_standard": _ok("long_standard", 0, 80.0, kind="fit", peak_mem_gib=30.25, epoch_time_s=100.0,
                             macs=30_500_000_000),
        "long_mita_m25": {"status": "failed", "estimate_s": 300.0, "error": "RuntimeError: CUDA out of memory",
                          "wall_s": 12.0, "card": "NVIDIA H100 80GB HBM3", "seed": 0},
        # stopped by the driver's projection: what it measured before shows, its last test accuracy does not
        "long_mita_m100": {"status": "killed", "estimate_s": 400.0, "epochs_done": 2, "train_images_per_s": 171.2,
                           "epoch_time_s": 134.2, "last_val_acc1": 55.5, "wall_s": 342.0,
                           "reason": "stopped after 2 of 4 epochs: projected to end 94 s after the budget (570 s)"},
    }, fit={"train_images_per_s": {"long_standard_probe": 600.0, "long_mita_m25_probe": 450.0},
            "val_images_per_s": {"long_standard_probe": 3000.0, "long_mita_m25_probe": 2500.0}, "epochs": 4,
            "train_images": 41000, "left_s": 450.0, "runs_per_gpu": 1, "estimate_s": 430.0},
        probes={"long_standard_probe": {"status": "ok", "peak_mem_gib": 12.5, "train_images_per_s": 600.0},
                "long_mita_m25_probe": {"status": "ok", "train_images_per_s": 450.0}})
    return [main1, ablations, mk1, long]


def _read(out, name):
    return (out / f"{name}.md").read_text()


def _line(text, start):
    hits = [line for line in text.splitlines() if line.startswith(start)]
    assert len(hits) == 1, (start, text)
    return hits[0]


def test_main_table(summaries, tmp_path):
    out = tmp_path / "out"
    assert collect_repro.main([*summaries, "--out", str(out), "--no-png"]) == 0
    text = _read(out, "main")
    mita = _line(text, "| MiTA (25 + 25) |")
    assert "| 2 (0, 1) | 90.50 ± 0.71 |" in mita and "| 5.50 | 1.100 | 3,000 | 9,000 |" in mita
    assert "s0 400 s, s1 410 s" in mita and "NVIDIA H100 80GB HBM3" in mita
    # one seed ok, the other killed: the killed one is named, its log's 77.7 appears nowhere
    dwc = _line(text, "| MiTA + DWC |")
    assert "| 1 (1) | 93.25 |" in dwc and "seed 0: killed at the budget" in dwc and "s0 560 s" in dwc
    assert "77.7" not in text and "2,100" not in text
    linear = _line(text, "| linear |")
    assert "| 0 | no ok run |" in linear and "skipped (estimated 243 s, 12 s left)" in linear
    assert "| — | — | — | — |" in linear
    # main2 never ran: its attentions have no row, and a line names the missing runs with their group
    assert "| MoBA |" not in text and "| top-k (50) |" not in text
    missing = _line(text, "Not in any summary")
    assert "`moba_s0` (main2)" in missing and "`standard_s1` (main2)" in missing and "mita_s0" not in missing


def test_ablations_mk_long_and_rows(summaries, tmp_path):
    out = tmp_path / "out"
    written = collect_repro.collect(summaries, str(out), png=False)
    assert set(written) == {"main", "ablations", "mk_grid", "long", "generalisation", "rows"}
    text = _read(out, "ablations")
    assert "| both (m = k = 25) | `mita_s0` | 90.00 |" in text and "| top-2 | `top2` | 88.80 |" in text
    assert "| random | `pool_random` | skipped (the budget ran out before it could start) | — | — |" in text
    assert "`route_only` (main2)" in text and "`pool_tome` (ablations)" in text

    grid = _read(out, "mk_grid")
    # collect_sweep's table: only the columns some ok run has (k = 36 has none yet)
    assert "| 9 | 85.50 | 86.00 | — |" in grid and "| 25 | — | — | 90.00 |" in grid and "| 36 |" not in grid
    assert "NVIDIA H200" in _line(grid, "| `mk_m9_k16` |")
    assert "`mk_m36_k36` (mk2)" in grid and "`mk_m9_k25` (mk1)" in grid

    long = _read(out, "long")
    # the probe's peak memory where its entry has one (long_mita_m25's has none)
    assert "41000 images x 4 epochs (1 run to a GPU, estimated 430 s; probed alone: long_standard 600 images/s " \
           "at 12.50 GiB, long_mita_m25 450 images/s)" in long
    assert "| standard | `long_standard` | 80.00 | 100.0 | 3,000 | 9,000 | 30.50 | 30.25 |" in long
    assert "| `long_mita_m25` | failed (RuntimeError: CUDA out of memory) | — | — | — | — | — |" in long
    killed = _line(long, "| MiTA m = k = 100 |")
    assert "stopped early (stopped after 2 of 4 epochs" in killed and "| 134.2 | 171 | — | — | — |" in killed
    assert "55.5" not in killed and "epochs done" not in killed

    rows = {r["name"]: r for r in json.loads((out / "rows.json").read_text())["rows"]}
    assert rows["mita_dwc_s0"]["status"] == "killed" and rows["mita_dwc_s0"]["top1"] is None
    assert rows["mk_m9_k16"]["source"] == summaries[2] and rows["mita_s0"]["group"] == "main1"


def test_rerun_keeps_the_ok_entry_and_png(summaries, tmp_path):
    rerun = _write(tmp_path / "rerun.json", "main1", {
        "linear_s0": _ok("linear_s0", 0, 89.0, card="NVIDIA H200"),
        "mita_s0": {"status": "skipped", "estimate_s": 471.0, "reason": "x"}})
    out = tmp_path / "out"
    written = collect_repro.collect([*summaries, rerun], str(out))
    text = _read(out, "main")
    assert "| 1 (0) | 89.00 |" in _line(text, "| linear |") and "| 2 (0, 1) | 90.50 ± 0.71 |" in text
    rows = {r["name"]: r for r in json.loads((out / "rows.json").read_text())["rows"]}
    assert rows["linear_s0"]["also_in"] == [summaries[0]] and rows["mita_s0"]["also_in"] == [rerun]
    assert (out / "mk_grid.png").stat().st_size > 0 and written["mk_grid_png"].endswith("mk_grid.png")


def test_probes_only_call_says_its_runs_were_skipped(summaries, tmp_path):
    probes = _write(tmp_path / "probes.json", "long", {
        "long_standard": {"status": "skipped", "estimate_s": 0.0, "reason": "no training subset fits 90 s"}},
        fit={"train_images_per_s": {"long_standard_probe": 500.0}, "epochs": 4, "train_images": 0,
             "runs_per_gpu": 3, "estimate_s": 146.0})
    out = tmp_path / "out"
    collect_repro.collect([*summaries, probes], str(out), png=False)
    long = _read(out, "long")
    assert f"Probes only in {probes}: no training subset fitted the time left, the runs were skipped" in long
    assert ": 0 images" not in long and "| 80.00 |" in _line(long, "| standard |")


def test_rejects_bad_input(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"setup": {}}))
    for argv in ([str(tmp_path / "missing.json"), "--out", str(tmp_path)], [str(bad), "--out", str(tmp_path)]):
        with pytest.raises(SystemExit) as err:
            collect_repro.main(argv)
        assert err.value.code == 2


def test_early_stop_shows_its_reason():
    row = {"status": "killed", "reason": "stopped after 2 of 16 epochs: projected to end 39 s after the budget"}
    assert collect_repro._status(row) == f"stopped early ({row['reason']})"
    assert collect_repro._status({"status": "killed"}) == "killed at the budget"


def test_generalisation_tables(summaries, tmp_path):
    mita = {"name": "mita", "num_landmarks": 25, "topk": 25}
    points = [{"num_landmarks": m, "topk": k, "training_point": (m, k) == (25, 25), "acc1": 80.0 + m / 10 + k / 100}
              for m in (16, 25) for k in (16, 25, 36)]
    points[-1]["acc1"] = None  # a point whose evaluation failed shows a dash, never a number
    analysis = {"kind": "mk_grid", "mk_grid": {"analysis": "mk_grid", "ckpt": ".ckpt/issue7/mita_fp16.pth",
                                               "attention": mita, "precision": "bf16", "n_images": 10000,
                                               "points": points}}
    swap = {"kind": "swap", "swap": {"labels": ["mita", "standard"], "precision": "bf16",
                                     "acc1": [[86.5, 62.25], [80.0, 87.75]]}}
    layers = [{"layer": i, "pruned_fraction": 0.25 + i / 100} for i in range(2)]
    figures = {"kind": "figures", "pruning": {"layers": layers},
               "experts": {"layers": [{"layer": 0, "outside_window_fraction": 0.875, "chance": 0.934}]},
               "overlap": {"layers": [{"layer": i, "mean_iou": 0.03, "chance_iou": 0.014} for i in range(2)]}}
    gen = _write(tmp_path / "gen.json", "generalisation", {
        "mk_grid": _ok("mk_grid", 0, None, **analysis), "swap": _ok("swap", 0, None, **swap),
        "figures": _ok("figures", 0, None, **figures),
        "finetune_std_to_mita": _ok("finetune_std_to_mita", 0, 87.25, kind="finetune", epochs=3, epochs_done=3,
                                    zero_shot_top1=80.5),
        "finetune_std_to_std": {"status": "killed", "estimate_s": 80.0, "epochs": 3, "wall_s": 50.0},
    })
    out = tmp_path / "out"
    written = collect_repro.collect([*summaries, gen], str(out), png=False)
    text = (out / "generalisation.md").read_text()
    assert written["generalisation"] == str(out / "generalisation.md")
    assert "trained at m = 25, k = 25" in text
    assert _line(text, "| 25 |") == "| 25 | 82.66 | **82.75** | — |"
    assert _line(text, "| mita |") == "| mita | 86.50 | 62.25 |"
    assert _line(text, "| standard checkpoint, MiTA").split(" | ")[1:4] == ["80.50", "3", "87.25"]
    assert "killed at the budget" in _line(text, "| standard checkpoint, standard kept")
    assert _line(text, "| MiTA from scratch").split(" | ")[3] == "90.00"
    # a layer one analysis lacks shows a dash
    assert _line(text, "| 1 |") == "| 1 | 0.260 | — | — | 0.030 | 0.014 |"


def test_figures_plot_the_ok_runs_and_the_benchmark_speeds(summaries, tmp_path):
    rows = collect_repro.load_summaries(summaries)[0]
    # runs' own speeds by default; MiTA + DWC has only its ok seed 1, linear (skipped) no point
    points = {label: rest for label, *rest in collect_repro.main_points(rows)}
    assert set(points) == {"standard", "MiTA (25 + 25)", "MiTA + DWC"}
    speed, values, mean, std = points["MiTA (25 + 25)"]
    assert speed == pytest.approx(3000.0) and values == [90.0, 91.0] and mean == pytest.approx(90.5)
    assert std == pytest.approx(0.7071, abs=1e-4) and points["MiTA + DWC"][1:] == [[93.25], 93.25, 0.0]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [{"attention": "mita", "train_images_per_s": 3595.0, "card": "NVIDIA H200"},
                                          {"attention": "standard", "train_images_per_s": 7734.0}]}))
    speeds = collect_repro.load_bench(str(bench))
    assert speeds == ({"mita": 3595.0, "standard": 7734.0}, "NVIDIA H200")
    points = {label: rest for label, *rest in collect_repro.main_points(rows, speeds)}
    assert set(points) == {"standard", "MiTA (25 + 25)"} and points["standard"][0] == 7734.0  # no bench row: no point
    # ablation bars: the ok runs only (pool_random was skipped), MiTA seed 0 first, its two seeds' band
    bars, band = collect_repro.ablation_bars(rows)
    assert bars == [("MiTA (both experts, top-1, 2-D pool; seed 0)", 90.0), ("routing: top-2", 88.8)]
    assert band[0] == pytest.approx(90.5) and band[2] == 2
    out = tmp_path / "out"
    written = collect_repro.collect(summaries, str(out), bench=str(bench))
    for name in ("main", "ablations"):
        assert (out / f"{name}.png").stat().st_size > 0 and written[f"{name}_png"].endswith(f"{name}.png")
    # nothing ok to plot: no figure, and no empty file
    assert collect_repro.ablation_bars({})[0] == [] and collect_repro.main_points({}) == []
    assert collect_repro.main_figure({}, str(tmp_path / "none.png")) is None and not (tmp_path / "none.png").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(ValueError, match="--bench"):
        collect_repro.load_bench(str(bad))
    with pytest.raises(SystemExit):
        collect_repro.main([*summaries, "--out", str(out), "--bench", str(tmp_path / "missing.json")])


def test_generalisation_absent(summaries, tmp_path):
    out = tmp_path / "out"
    collect_repro.collect(summaries, str(out), png=False)
    text = (out / "generalisation.md").read_text()
    assert "86." not in text and "Not in any summary (left out): `mk_grid` (generalisation)" in text


def test_mk_grid_averages_the_seed1_point(summaries, tmp_path):
    # 36 x 36 with seed 1 (the plan's MK_SEED1) is averaged with its seed 0; its own row names its seed
    seeds = _write(tmp_path / "mk2.json", "mk2", {"mk_m36_k36": _ok("mk_m36_k36", 0, 88.0),
                                                  "mk_m36_k36_s1": _ok("mk_m36_k36_s1", 1, 87.0)})
    out = tmp_path / "out"
    collect_repro.collect([*summaries, seeds], str(out), png=False)
    grid = _read(out, "mk_grid")
    assert "mean ± std over up to 2 seeds" in grid and "87.50 ± 0.71" in _line(grid, "| 36 |")
    assert "| mk_m36_k36_s1 | 36 | 36 | 1 |" in grid and "`mk_m36_k36_s1` | 36 | 36 | ok |" in grid

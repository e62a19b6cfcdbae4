"""mita.analysis.reproduction (scripts/collect_repro.py): the reproduction's tables from run folders.

Synthetic folders in train.py's layout (config.yaml, log.jsonl, eval.json, result.json), and the committed
runs of results/fmnist_repro/, whose tables must come out as committed.
"""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from mita.analysis import reproduction as collect_repro

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "fmnist_repro"


def _run(root, name, top1, *, seed=None, epochs=16, done=None, card="NVIDIA H100 80GB HBM3", wall=400.0,
         attention=None, error=None, **record):
    """A run folder as train.py writes it, with the result.json of what was measured beside it (``record``;
    none when ``card`` is None). ``done`` epochs logged (default all); the last logs ``top1``."""
    folder = root / name
    folder.mkdir(parents=True)
    seed = int(name.rsplit("seed", 1)[1]) if seed is None else seed
    config = {"seed": seed, "attention": attention or {"name": "mita"}, "trainer": {"epochs": epochs},
              "data": {"max_train_samples": record.pop("train_images", None)}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    done = epochs if done is None else done
    lines = [{"epoch": e, "train_images_per_s": 2000.0 + 100 * e, "epoch_time_s": 30.0 - e, "n_params": 5_500_000}
             for e in range(done)]
    if lines:
        lines[-1].update(val_acc1=top1, val_acc5=99.0)
    if error:
        lines.append({"error": error})
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if card is not None:
        (folder / "result.json").write_text(json.dumps({
            "card": card, "wall_s": wall, "train_command": f"python train.py seed={seed}", "macs": 1_100_000_000,
            "infer_images_per_s": 9000.0, "train_images_per_s": 3000.0, "epoch_time_s": 20.0, **record}))
    return folder


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "fmnist_repro"
    _run(root, "mita_m25_k25/seed0", 90.0)
    _run(root, "mita_m25_k25/seed1", 91.0, wall=410.0)
    _run(root, "standard/seed0", 92.5)
    # stopped after 9 of 16 epochs: its log's speed and last evaluation must never reach a table
    _run(root, "mita_dwc_m25_k25/seed0", 77.7, done=9, card=None)
    _run(root, "mita_dwc_m25_k25/seed1", 93.25)
    _run(root, "linear/seed0", 55.0, done=1, error="non-finite loss nan at epoch 1", card=None)
    _run(root, "mita_top2_m25_k12/seed0", 88.8)
    _run(root, "mita_random/seed0", 60.0, done=2, card=None)
    _run(root, "mita_m9_k9/seed0", 85.5)
    _run(root, "mita_m9_k16/seed0", 86.0, card="NVIDIA H200")
    _run(root, "long/standard/seed0", 80.0, epochs=4, peak_mem_gib=30.25, epoch_time_s=100.0,
         macs=30_500_000_000, train_images=41000)
    _run(root, "long/mita_m25_k25/seed0", 0.0, epochs=4, done=0, error="RuntimeError: CUDA out of memory",
         card=None, train_images=41000)
    _run(root, "long/mita_m100_k100/seed0", 55.5, epochs=4, done=2, card=None, train_images=41000)
    return root


def _read(out, name):
    return (out / f"{name}.md").read_text()


def _line(text, start):
    hits = [line for line in text.splitlines() if line.startswith(start)]
    assert len(hits) == 1, (start, text)
    return hits[0]


def test_main_table(runs, tmp_path):
    out = tmp_path / "out"
    assert collect_repro.main([str(runs), "--out", str(out), "--no-png"]) == 0
    text = _read(out, "main")
    mita = _line(text, "| MiTA (25 + 25) |")
    assert "| 2 (0, 1) | 90.50 ± 0.71 |" in mita and "| 5.50 | 1.100 | 3,000 | 9,000 |" in mita
    assert "s0 400 s, s1 410 s" in mita and "NVIDIA H100 80GB HBM3" in mita
    # one seed ok, the other unfinished: the unfinished one is named, its log's 77.7 appears nowhere
    dwc = _line(text, "| MiTA + DWC |")
    assert "| 1 (1) | 93.25 |" in dwc and "seed 0: unfinished (9 of 16 epochs)" in dwc and "s0 —" in dwc
    assert "77.7" not in text and "2,800" not in text
    linear = _line(text, "| linear |")
    assert "| 0 | no ok run |" in linear and "failed (non-finite loss nan at epoch 1)" in linear
    assert "| — | — | — | — |" in linear
    # MoBA and top-k never ran: no row, and a line names the missing runs with their table
    assert "| MoBA |" not in text and "| top-k (50) |" not in text
    missing = _line(text, "Not in any run folder")
    assert "`moba_b25_s2/seed0` (main)" in missing and "`standard/seed1` (main)" in missing
    assert "mita_m25_k25" not in missing


def test_ablations_mk_long_and_rows(runs, tmp_path):
    out = tmp_path / "out"
    written = collect_repro.collect(str(runs), str(out), png=False)
    assert set(written) == {"main", "ablations", "mk_grid", "long", "generalisation", "rows"}
    text = _read(out, "ablations")
    assert "| both (m = k = 25) | `mita_m25_k25/seed0` | 90.00 |" in text
    assert "| top-2 | `mita_top2_m25_k12/seed0` | 88.80 |" in text
    assert "| random | `mita_random/seed0` | unfinished (2 of 16 epochs) | — | — |" in text
    assert "`mita_route_only_m25_k50/seed0` (ablations)" in text and "`mita_tome/seed0` (ablations)" in text

    grid = _read(out, "mk_grid")
    # collect_sweep's table: only the columns some ok run has (k = 36 has none yet)
    assert "| 9 | 85.50 | 86.00 | — |" in grid and "| 25 | — | — | 90.00 |" in grid and "| 36 |" not in grid
    assert "NVIDIA H200" in _line(grid, "| `mita_m9_k16/seed0` |")
    assert "`mita_m36_k36/seed0`" in grid and "`mita_m9_k25/seed0`" in grid

    long = _read(out, "long")
    assert "Training subset: 41000 images x 4 epochs" in long
    assert "| standard | `long/standard/seed0` | 80.00 | 100.0 | 3,000 | 9,000 | 30.50 | 30.25 |" in long
    assert "| `long/mita_m25_k25/seed0` | failed (RuntimeError: CUDA out of memory) | — | — | — | — | — |" in long
    stopped = _line(long, "| MiTA m = k = 100 |")
    # what it measured before it stopped shows (median s / epoch and images/s of the epochs after the first)
    assert "unfinished (2 of 4 epochs)" in stopped and "| 29.0 | 2,100 | — | — | — |" in stopped
    assert "55.5" not in stopped and "epochs done" not in stopped

    rows = {r["name"]: r for r in json.loads((out / "rows.json").read_text())["rows"]}
    assert rows["mita_dwc_m25_k25/seed0"]["status"] == "unfinished" and rows["mita_dwc_m25_k25/seed0"]["top1"] is None
    assert rows["mita_m9_k16/seed0"]["source"] == str(runs / "mita_m9_k16" / "seed0")
    assert rows["mita_m25_k25/seed0"]["table"] == "main"


def test_a_run_without_its_record_reads_its_log_and_eval(tmp_path):
    """A run as a user's multirun leaves it: no result.json; top-1 from the last evaluation (eval.py's if run),
    the speeds from the log, multiply-adds from eval.json."""
    root = tmp_path / "runs"
    folder = _run(root, "standard/seed0", 87.5, card=None)
    row = collect_repro.read_run(str(folder))
    assert row["status"] == "ok" and row["top1"] == 87.5 and row["params"] == 5_500_000 and row["macs"] is None
    assert row["train_images_per_s"] == 2800.0 and row["epoch_time_s"] == 22.0 and row["card"] is None
    (folder / "eval.json").write_text(json.dumps({"acc1": 87.75, "acc5": 99.5, "params": 5_400_000, "macs": 1.2e9}))
    row = collect_repro.read_run(str(folder))
    assert (row["top1"], row["top5"], row["params"], row["macs"]) == (87.75, 99.5, 5_400_000, 1.2e9)


def test_rerun_of_a_folder_and_png(runs, tmp_path):
    shutil.rmtree(runs / "linear" / "seed0")
    _run(runs, "linear/seed0", 89.0, card="NVIDIA H200")
    out = tmp_path / "out"
    written = collect_repro.collect(str(runs), str(out))
    text = _read(out, "main")
    assert "| 1 (0) | 89.00 |" in _line(text, "| linear |") and "| 2 (0, 1) | 90.50 ± 0.71 |" in text
    assert (out / "mk_grid.png").stat().st_size > 0 and written["mk_grid_png"].endswith("mk_grid.png")


def test_rejects_bad_input(tmp_path):
    for argv in ([str(tmp_path / "missing"), "--out", str(tmp_path)],
                 [str(tmp_path), "--bench", str(tmp_path / "missing.json")]):
        with pytest.raises(SystemExit) as err:
            collect_repro.main(argv)
        assert err.value.code == 2


def test_status_names_why():
    assert collect_repro._status({"status": "unfinished", "epochs_done": 2, "epochs": 16}) == \
        "unfinished (2 of 16 epochs)"
    assert collect_repro._status({"status": "failed", "error": "a | b"}) == "failed (a / b)"


def _analyses(root):
    mita = {"name": "mita", "num_landmarks": 25, "topk": 25}
    points = [{"num_landmarks": m, "topk": k, "training_point": (m, k) == (25, 25), "acc1": 80.0 + m / 10 + k / 100}
              for m in (16, 25) for k in (16, 25, 36)]
    points[-1]["acc1"] = None  # a point whose evaluation failed shows a dash, never a number
    files = {
        "mk_grid/mk_grid.json": {"analysis": "mk_grid", "ckpt": "mita.pth", "attention": mita, "precision": "bf16",
                                 "n_images": 10000, "points": points},
        "swap/swap.json": {"labels": ["mita", "standard"], "precision": "bf16", "acc1": [[86.5, 62.25], [80.0, 87.75]]},
        "figures/pruning.json": {"layers": [{"layer": i, "pruned_fraction": 0.25 + i / 100} for i in range(2)]},
        "figures/experts.json": {"layers": [{"layer": 0, "outside_window_fraction": 0.875, "chance": 0.934}]},
        "figures/overlap.json": {"layers": [{"layer": i, "mean_iou": 0.03, "chance_iou": 0.014} for i in range(2)]},
        "mk_grid/result.json": {"card": "NVIDIA H200", "wall_s": 99.0},
    }
    for name, payload in files.items():
        path = root / "analysis" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload))


def test_generalisation_tables(runs, tmp_path):
    _analyses(runs)
    _run(runs, "finetune/mita_m25_k25/seed0", 87.25, epochs=3)
    (runs / "finetune/mita_m25_k25/seed0/zero_shot.json").write_text(json.dumps({"acc1": 80.5}))
    _run(runs, "finetune/standard/seed0", 88.0, epochs=3, done=1, card=None)
    out = tmp_path / "out"
    written = collect_repro.collect(str(runs), str(out), png=False)
    text = (out / "generalisation.md").read_text()
    assert written["generalisation"] == str(out / "generalisation.md")
    assert "trained at m = 25, k = 25" in text and "NVIDIA H200, 99 s" in text
    assert _line(text, "| 25 |") == "| 25 | 82.66 | **82.75** | — |"
    assert _line(text, "| mita |") == "| mita | 86.50 | 62.25 |"
    assert _line(text, "| standard checkpoint, MiTA").split(" | ")[1:4] == ["80.50", "3", "87.25"]
    assert "unfinished (1 of 3 epochs)" in _line(text, "| standard checkpoint, standard kept")
    assert _line(text, "| MiTA from scratch").split(" | ")[3] == "90.00"
    # a layer one analysis lacks shows a dash
    assert _line(text, "| 1 |") == "| 1 | 0.260 | — | — | 0.030 | 0.014 |"


def test_figures_plot_the_ok_runs_and_the_benchmark_speeds(runs, tmp_path):
    rows = collect_repro.load_runs(str(runs))
    # runs' own speeds by default; MiTA + DWC has only its ok seed 1, linear (failed) no point
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
    # ablation bars: the ok runs only (random is unfinished), MiTA seed 0 first, its two seeds' band
    bars, band = collect_repro.ablation_bars(rows)
    assert bars == [("MiTA (both experts, top-1, 2-D pool; seed 0)", 90.0), ("routing: top-2", 88.8)]
    assert band[0] == pytest.approx(90.5) and band[2] == 2
    out = tmp_path / "out"
    written = collect_repro.collect(str(runs), str(out), bench=str(bench))
    for name in ("main", "ablations"):
        assert (out / f"{name}.png").stat().st_size > 0 and written[f"{name}_png"].endswith(f"{name}.png")
    # nothing ok to plot: no figure, and no empty file
    assert collect_repro.ablation_bars({})[0] == [] and collect_repro.main_points({}) == []
    assert collect_repro.main_figure({}, str(tmp_path / "none.png")) is None and not (tmp_path / "none.png").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(ValueError, match="--bench"):
        collect_repro.load_bench(str(bad))


def test_generalisation_absent(runs, tmp_path):
    out = tmp_path / "out"
    collect_repro.collect(str(runs), str(out), png=False)
    text = (out / "generalisation.md").read_text()
    assert "86." not in text and "`analysis/mk_grid/mk_grid.json`: not found." in text
    assert "Not in any run folder (left out): `finetune/mita_m25_k25/seed0` (generalisation)" in text


def test_mk_grid_averages_the_seed1_point(runs, tmp_path):
    # 36 x 36 with seed 1 (MK_MORE_SEEDS) is averaged with its seed 0; its own row names its seed
    _run(runs, "mita_m36_k36/seed0", 88.0)
    _run(runs, "mita_m36_k36/seed1", 87.0)
    out = tmp_path / "out"
    collect_repro.collect(str(runs), str(out), png=False)
    grid = _read(out, "mk_grid")
    assert "mean ± std over up to 2 seeds" in grid and "87.50 ± 0.71" in _line(grid, "| 36 |")
    assert "| mita_m36_k36/seed1 | 36 | 36 | 1 |" in grid and "`mita_m36_k36/seed1` | 36 | 36 | ok |" in grid


def test_committed_tables_are_what_the_committed_runs_give(tmp_path, monkeypatch):
    """results/fmnist_repro/tables/ (RESULTS.md's numbers) is what the collector writes from the run folders
    beside it, with the benchmark speeds RESULTS.md names."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "tables"
    collect_repro.collect("results/fmnist_repro", str(out), png=False,
                          bench="results/fmnist_repro/speed/models_h200_rounds.json")
    for name in ("main", "ablations", "mk_grid", "long", "generalisation"):
        assert (out / f"{name}.md").read_text() == (RESULTS / "tables" / f"{name}.md").read_text(), name
    rows = {r["name"]: r for r in json.loads((out / "rows.json").read_text())["rows"]}
    assert rows["mita_m25_k25/seed0"]["top1"] == 86.4 and rows["mita_m36_k36/seed0"]["top1"] == 87.96
    assert sum(r["status"] == "ok" for r in rows.values()) == len(rows)

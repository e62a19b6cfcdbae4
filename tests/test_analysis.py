"""The analyses (mita.analysis, ``python -m mita.analysis NAME``) on tiny checkpoints."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from mita.analysis import cli
from mita.analysis.routing import expert_iou, key_masks, landmark_windows, query_masks, token_selection
from mita.attention import pool_patch_queries
from mita.config import CONFIG_DIR, compose
from mita.engine.evaluation import evaluate_checkpoint
from mita.engine.training import train
from mita.landmarks import build_landmark_extractor

REPO = CONFIG_DIR.parent


def _command(name):
    """``python -m mita.analysis NAME`` as a callable: ``.main(argv)`` runs ``cli.main([NAME, *argv])``."""
    return SimpleNamespace(main=lambda argv=None: cli.main([name, *(argv or [])]))


analysis_ablations, analysis_experts, analysis_mk_grid, analysis_overlap, analysis_pruning, analysis_swap = (
    _command(name) for name in ("ablations", "experts", "mk_grid", "overlap", "pruning", "swap"))

# 16 x 16 synthetic images, patch 2: 8 x 8 patches + cls = 65 tokens; width 32, 2 blocks, 2 heads, 2 steps.
TINY = ["data=synthetic", "data.img_size=16", "data.synthetic_size=32", "model.kwargs.embed_dim=32",
        "model.kwargs.depth=2", "model.kwargs.num_heads=2", "trainer.global_batch_size=8", "trainer.epochs=1",
        "trainer.progress=false", "sched.warmup_epochs=0", "logger=none", "trainer.max_steps_per_epoch=2"]
MITA = ["attention=mita", "attention.num_landmarks=4", "attention.topk=8"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: the tiny models gain nothing from two, and lose much when the 2-core machine is shared
    (the training runs also set trainer.threads=1 process-wide); restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny checkpoints trained with MiTA (m=4, k=8), standard and Agent (16 agents) attention."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    paths = {}
    for name, att in (("mita", MITA), ("standard", ["attention=standard"]), ("agent", ["attention=agent",
                                                                                      "attention.num_agents=16"])):
        cfg = compose("train", [*TINY, *att, f"run_dir={root / name}"])
        train(cfg)
        paths[name] = str(root / name / "checkpoint.pth")
    torch.set_num_threads(threads)
    return paths


def _plain_eval(ckpt, *overrides):
    return evaluate_checkpoint(compose("eval", [f"ckpt={ckpt}", "flops=false", *overrides]))


def _png(path):
    data = path.read_bytes()
    assert data[:4] == b"\x89PNG" and len(data) > 2000
    return data


def test_masks_iou_and_selection_by_hand():
    # N = 6 tokens, m = 3 experts, k = 2: expert 0 keeps {0, 1}, expert 1 {2, 3}, expert 2 {4, 5}.
    topk_idx = torch.tensor([[0, 1], [2, 3], [4, 5]]).view(1, 1, 3, 2)
    # Queries 0, 1 -> expert 0; 2, 3, 4, 5 -> expert 1; expert 2 idle.
    expert_idx = torch.tensor([0, 0, 1, 1, 1, 1]).view(1, 1, 6, 1)
    keys, queries = key_masks(topk_idx, 6), query_masks(expert_idx, 3)
    assert keys.shape == queries.shape == (1, 1, 3, 6)
    assert keys[0, 0, 2].tolist() == [False] * 4 + [True] * 2 and not queries[0, 0, 2].any()
    iou, chance, valid = expert_iou(topk_idx, expert_idx)
    assert iou[0, 0].tolist() == pytest.approx([1.0, 0.5, 0.0])
    # Random sets of sizes 2 and 2 among 6: E|A n B| = 4/6, IoU = (2/3) / (4 - 2/3).
    assert chance[0, 0, 0].item() == pytest.approx((2 / 3) / (4 - 2 / 3))
    assert valid.all()
    selected, used = token_selection(topk_idx, expert_idx)
    assert selected[0].all() and used[0].tolist() == [True] * 4 + [False] * 2
    # Top-2 routing: a query counts for both of its experts.
    both = query_masks(torch.tensor([[0, 2]] * 6).view(1, 1, 6, 2), 3)
    assert both[0, 0, 0].all() and both[0, 0, 2].all() and not both[0, 0, 1].any()
    # k = 0 and no query: IoU undefined, flagged invalid.
    _, _, valid = expert_iou(torch.zeros(1, 1, 3, 0, dtype=torch.long), expert_idx)
    assert valid[0, 0].tolist() == [True, True, False]


@pytest.mark.parametrize("pool,h,w,grid,p", [("grid", 5, 7, (2, 3), 1), ("grid", 6, 6, (4, 4), 2),
                                              ("official", 4, 4, (3, 3), 1)])
def test_landmark_windows_are_the_pooling_windows(pool, h, w, grid, p):
    N = p + h * w
    q = torch.eye(N, dtype=torch.float64).view(1, 1, N, N)  # token t's query is the unit vector e_t
    extractor = build_landmark_extractor(pool, grid[0] * grid[1], landmark_grid=grid)
    pooled = extractor(q, q, p, h, w)[0, 0]  # [m, N]: the weight of each token in each landmark
    windows = landmark_windows(pool, (h, w), grid, p, N)
    assert torch.equal(windows, pooled > 0)
    if pool == "grid":
        assert torch.equal(windows, pool_patch_queries(q, p, h, w, grid)[0, 0] > 0)
    assert landmark_windows("random", (h, w), None, p, N) is None


def test_pruning(ckpts, tmp_path):
    # Drawn images index the whole split (32 images), the statistics use a 16-image subset.
    argv = [ckpts["mita"], "--out", str(tmp_path), "--images", "0,20", "--max-images", "16", "--no-progress"]
    assert analysis_pruning.main(argv) == 0
    _png(tmp_path / "pruning.png")
    report = json.loads((tmp_path / "pruning.json").read_text())
    assert report["n_images"] == 16 and len(report["layers"]) == 2 and report["images_drawn"] == [0, 20]
    for row in report["layers"]:
        for key in ("pruned_fraction", "unused_fraction", "pruned_fraction_per_head", "pruned_patch_fraction",
                    "prefix_selected_fraction"):
            assert 0.0 <= row[key] <= 1.0, key
        # Not kept by a busy expert includes not kept at all; one head prunes at least what all heads prune.
        assert row["unused_fraction"] >= row["pruned_fraction"]
        assert row["pruned_fraction_per_head"] >= row["pruned_fraction"]
        # 4 experts x 8 keys x 2 heads cover at most 64 of the 65 tokens.
        assert row["pruned_fraction"] >= 1 / 65
    assert (tmp_path / "pruning.csv").read_text().startswith("layer,module,pruned_fraction")


def test_experts(ckpts, tmp_path):
    argv = [ckpts["mita"], "--out", str(tmp_path), "--image", "3", "--experts", "0,3", "--no-progress"]
    assert analysis_experts.main(argv) == 0
    _png(tmp_path / "experts.png")
    report = json.loads((tmp_path / "experts.json").read_text())
    assert [(r["layer"], r["expert"]) for r in report["drawn"]] == [(0, 0), (0, 3), (1, 0), (1, 3)]
    for row in report["drawn"]:
        assert 0.0 <= row["keys_outside_window"] <= 1.0 and row["window_size"] == 16  # 8x8 patches, 2x2 landmarks
        assert row["keys_per_head"] == 8
    for row in report["layers"]:
        assert 0.0 <= row["outside_window_fraction"] <= 1.0
        assert row["chance"] == pytest.approx(1 - 16 / 65)


def test_overlap(ckpts, tmp_path):
    assert analysis_overlap.main([ckpts["mita"], "--out", str(tmp_path), "--max-images", "16", "--no-progress"]) == 0
    _png(tmp_path / "overlap.png")
    report = json.loads((tmp_path / "overlap.json").read_text())
    assert report["n_images"] == 16
    for row in report["layers"]:
        assert 0.0 <= row["min_iou"] <= row["mean_iou"] <= row["max_iou"] <= 1.0
        assert 0.0 <= row["chance_iou"] <= 1.0 and 0.0 <= row["idle_fraction"] <= 1.0
        assert len(row["per_head_iou"]) == 2


def test_mk_grid_training_point_is_a_plain_eval(ckpts, tmp_path):
    # m = 81 exceeds the 64 patches: kept as a blank cell with its error.
    argv = [ckpts["mita"], "--out", str(tmp_path), "--num-landmarks", "1,81", "--topk", "16", "--no-progress"]
    assert analysis_mk_grid.main(argv) == 0
    _png(tmp_path / "mk_grid.png")
    report = json.loads((tmp_path / "mk_grid.json").read_text())
    assert report["num_landmarks"] == [1, 4, 81] and report["topk"] == [8, 16]  # training point (4, 8) added
    points = {(p["num_landmarks"], p["topk"]): p for p in report["points"]}
    assert len(points) == 6 and all("error" in points[(81, k)] and "acc1" not in points[(81, k)] for k in (8, 16))
    plain = _plain_eval(ckpts["mita"])
    assert points[(4, 8)]["training_point"] and points[(4, 8)]["acc1"] == pytest.approx(plain["acc1"])
    assert points[(4, 8)]["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    other = _plain_eval(ckpts["mita"], "attention.num_landmarks=1", "attention.topk=16")
    assert points[(1, 16)]["loss"] == pytest.approx(other["loss"], rel=1e-6)


def test_swap_matrix_diagonal_is_the_native_evals(ckpts, tmp_path):
    order = ["mita", "standard", "agent"]
    argv = [*(ckpts[n] for n in order), "--out", str(tmp_path), "--labels", ",".join(order), "--no-progress"]
    assert analysis_swap.main(argv) == 0
    _png(tmp_path / "swap.png")
    report = json.loads((tmp_path / "swap.json").read_text())
    cells = {(c["weights"], c["attention"]): c for c in report["cells"]}
    assert len(cells) == 9 and report["labels"] == order
    for name in order:
        native = _plain_eval(ckpts[name])
        assert cells[(name, name)]["acc1"] == pytest.approx(native["acc1"])
        assert cells[(name, name)]["loss"] == pytest.approx(native["loss"], rel=1e-6)
    # An off-diagonal cell is eval.py's attention swap.
    swapped = _plain_eval(ckpts["standard"], "attention=mita", "attention.num_landmarks=4", "attention.topk=8")
    assert cells[("standard", "mita")]["loss"] == pytest.approx(swapped["loss"], rel=1e-6)
    assert cells[("standard", "mita")]["missing_keys"] == []


def _fake_run(folder, attention, acc, seed=0):
    folder.mkdir(parents=True)
    lines = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in attention.items())
    (folder / "config.yaml").write_text(f"seed: {seed}\nattention:\n{lines}\ntrainer:\n  epochs: 1\n")
    (folder / "log.jsonl").write_text(json.dumps({"epoch": 0, "val_acc1": acc}) + "\n")


def test_ablation_tables(tmp_path, capsys):
    base = {"name": "mita", "num_landmarks": 25, "topk": 25, "router_topk": 1, "shared": True, "pool": "grid",
            "dwc": False, "gate": False}
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "both0", base, 70.0)
    _fake_run(sweep / "both1", base, 72.0, seed=1)
    _fake_run(sweep / "pool_1d", dict(base, pool="1d"), 69.0)
    _fake_run(sweep / "route_only", dict(base, shared=False, topk=50, base_topk=25), 68.0)
    _fake_run(sweep / "compress_only", dict(base, topk=0), 60.0)
    _fake_run(sweep / "top2", dict(base, router_topk=2, topk=12, base_topk=25), 71.5)
    _fake_run(sweep / "dwc", dict(base, dwc=True), 90.0)  # left out of every table
    _fake_run(sweep / "standard", {"name": "standard"}, 99.0)
    assert analysis_ablations.main([str(sweep), "--out", str(tmp_path / "abl")]) == 0
    text = (tmp_path / "abl.md").read_text()
    extractors, experts, routing = text.split("## ")[1:]
    assert "| grid | 71.00 ± 1.41 |" in extractors and "| 1d | 69.00 |" in extractors
    assert "route-only" not in extractors and "90.00" not in text and "99.00" not in text
    assert "| both (k=25) | 71.00 ± 1.41 |" in experts and "| route-only (k=50) | 68.00 |" in experts
    assert "| compress-only (k=0) | 60.00 |" in experts and "1d" not in experts
    assert "| top-1 | 71.00 ± 1.41 |" in routing and "| top-2 | 71.50 |" in routing
    assert "| routing \\ setting | m=25, k=25 |" in routing
    report = json.loads((tmp_path / "abl.json").read_text())
    assert len(report["tables"]["Top-1 vs top-2 routing"]) == 3
    assert analysis_ablations.main([str(tmp_path / "sweep" / "standard")]) == 1


@pytest.mark.parametrize("script,argv,needle", [
    (analysis_pruning, ["nope.pth"], "ckpt='nope.pth': no such file"),
    (analysis_pruning, ["{standard}"], "no MiTA attention"),
    (analysis_pruning, ["{mita}", "--images", "40"], "images=[40]"),
    (analysis_pruning, ["{mita}", "foo.bar=1", "x.pth"], "one checkpoint expected"),
    (analysis_overlap, ["{mita}", "attention.topk=100"], "topk"),
    (analysis_experts, ["{mita}", "--experts", "4"], "experts=[4]"),
    (analysis_mk_grid, ["{mita}", "--num-landmarks", "5"], "not perfect squares"),
    (analysis_mk_grid, ["{standard}"], "pass a MiTA checkpoint"),
    (analysis_mk_grid, ["{standard}", "attention.name=mita"], "pass attention.num_landmarks"),
    (analysis_mk_grid, ["{mita}", "--topk", "a,b"], "--topk"),
    (analysis_swap, ["{mita}"], "two or more checkpoints"),
    (analysis_swap, ["{mita}", "{standard}", "attention.topk=4"], "GROUP.KEY=VALUE with GROUP one of ['data']"),
])
def test_bad_input_names_the_argument(ckpts, tmp_path, capsys, script, argv, needle):
    argv = [a.format(**ckpts) for a in argv] + ["--out", str(tmp_path), "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_fp16_export_is_an_analysable_checkpoint(ckpts, tmp_path):
    """eval.py's weights-only fp16 export (export=PATH) is read by the analyses like the checkpoint itself."""
    fp16 = tmp_path / "model_fp16.pth"
    evaluate_checkpoint(compose("eval", [f"ckpt={ckpts['mita']}", f"export={fp16}"]))
    assert fp16.is_file()
    assert analysis_overlap.main([str(fp16), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    _png(tmp_path / "again" / "overlap.png")


def test_python_m_mita_analysis(ckpts, tmp_path):
    """The module's command line: its commands listed, an unknown one refused, one run end to end."""
    run = [sys.executable, "-m", "mita.analysis"]
    result = subprocess.run(run + ["--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and all(name in result.stdout for name in cli.COMMANDS)
    result = subprocess.run(run + ["nope"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "unknown NAME 'nope'" in result.stderr
    result = subprocess.run(run + ["overlap", ckpts["mita"], "--out", str(tmp_path), "--max-images", "8",
                                   "--no-progress"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    _png(tmp_path / "overlap.png")

"""mita.engine.validate: config errors found when the config is read, in one line naming the full key."""
import pytest

from mita.config import CONFIG_DIR, compose
from mita.engine.validate import ConfigError, check_model, check_segment, check_train, debug_enabled

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
ATTENTIONS = sorted(p.stem for p in (CONFIG_DIR / "attention").glob("*.yaml") if p.stem != "checkpoint")
SEG_EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "seg_experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_passes(name):
    grid = check_train(compose("train", [f"experiment={name}"]), world_size=1)
    assert grid.tokens == grid.prefix + grid.h * grid.w and grid.h >= 7


@pytest.mark.parametrize("name", ATTENTIONS)
def test_every_attention_preset_passes(name):
    grid = check_train(compose("train", [f"attention={name}"]), world_size=1)
    assert (grid.prefix, grid.h, grid.w) == (1, 14, 14)  # the default: 28 px, patch 2


@pytest.mark.parametrize("name", SEG_EXPERIMENTS)
def test_every_segmentation_experiment_passes(name):
    check_segment(compose("segment", [f"seg_experiment={name}"]))


# The default config: a 14 x 14 grid of patches + the class token = 197 tokens.
@pytest.mark.parametrize("overrides, message", [
    (["attention.num_landmarks=10000"], "attention.num_landmarks=10000 must lie in [1, 196] for pool=grid on a 14 x 14 grid"),
    (["attention.topk=500"], "attention.topk=500 must lie in [0, 197] (197 tokens: 1 prefix + 14 x 14 patches)"),
    (["attention.topk=-1"], "attention.topk=-1 must lie in [0, 197] (197 tokens: 1 prefix + 14 x 14 patches)"),
    (["attention.pool=tome", "attention.num_landmarks=200"],
     "attention.num_landmarks=200 must lie in [1, 196] for pool=tome on a 14 x 14 grid"),
    (["attention.num_landmarks=20"], "attention.num_landmarks=20 is not a perfect square; pass attention.landmark_grid"),
    (["attention.router_topk=30"], "attention.router_topk must be an int in [1, attention.num_landmarks=25], got 30"),
    (["attention.shared=false", "attention.topk=0"], "attention.topk=0 with attention.shared=False leaves no expert"),
    (["attention.pool=official", "+model.kwargs.reg_tokens=4"],
     "attention.pool=official needs one prefix token and a square patch grid, the model has 5 and 14 x 14"),
    (["attention=topk", "attention.topk=198"], "attention.topk=198 must lie in [1, 197] (197 tokens: 1 prefix + 14 x 14"),
    (["attention=agent", "attention.num_agents=50"], "attention.num_agents must be a perfect square"),
    (["+attention.heads=4"], "attention=mita has no option attention.heads"),
    (["attention=checkpoint"], "attention.name is not set"),
    (["model.kwargs.num_heads=3"], "model.arch=deit_tiny_patch16_224 with model.kwargs.patch_size=2"),
    (["model.arch=resnet_50"], "model.arch='resnet_50' is not a timm ViT name"),
    (["model.img_size=32"], "model.img_size=32 must equal data.img_size=28"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' must be one of ['fp32', 'fp16', 'bf16']"),
    (["trainer.epochs=0"], "trainer.epochs must be >= 1, got 0"),
    (["trainer.epochs=3", "sched.warmup_epochs=3"], "sched.warmup_epochs=3 must lie in [0, trainer.epochs=3)"),
    (["optim.lr=0"], "optim.lr=0 must be a finite value > 0"),
    (["trainer.global_batch_size=64", "data.max_train_samples=32"],
     "data.max_train_samples=32 is fewer images than one training batch (trainer.global_batch_size=64)"),
    (["data.max_val_samples=0"], "data.max_val_samples=0 must be an integer >= 1 or null"),
    (["logger.name=tensorboard"], "logger.name='tensorboard' must be one of ['wandb', 'none']"),
])
def test_errors_name_the_config_key_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        check_train(compose("train", overrides), world_size=1)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_token_grid_follows_the_model():
    # DeiT-Small at 224 px: 14 x 14 + cls; at 384 px: 24 x 24; ViT-5 adds 4 registers
    deit = compose("train", ["experiment=deit_small_mita"])
    assert check_train(deit, world_size=1).tokens == 197
    with pytest.raises(ConfigError, match=r"^attention\.num_landmarks=400 must lie in \[1, 196\]"):
        check_train(compose("train", ["experiment=deit_small_mita", "attention.num_landmarks=400"]), world_size=1)
    big = compose("train", ["experiment=deit_small_mita", "attention.num_landmarks=400", "data.img_size=384"])
    assert check_train(big, world_size=1).tokens == 577
    assert check_train(compose("train", ["experiment=vit5_small_mita"]), world_size=1).prefix == 5
    # torchrun's world size divides the global batch
    with pytest.raises(ConfigError, match=r"^trainer\.global_batch_size=1024 is not divisible by the 3 ranks"):
        check_train(deit, world_size=3)


def test_model_check_for_eval_and_segmentation():
    model = dict(arch="deit_tiny_patch16_224", img_size=32, in_chans=3, num_classes=10, kwargs={"patch_size": 4})
    assert check_model(model, {"name": "mita", "num_landmarks": 64, "topk": 65}).tokens == 65
    with pytest.raises(ConfigError, match=r"^attention\.topk=66 must lie in \[0, 65\]"):
        check_model(model, {"name": "mita", "num_landmarks": 64, "topk": 66})
    # the decoder's sequence: the patches and the class tokens
    seg = ["seg_experiment=fmnist_cpu", "attention=mita", "attention@decoder_attention=mita"]
    with pytest.raises(ConfigError, match=r"^attention\.num_landmarks=400 must lie in \[1, 196\]"):
        check_segment(compose("segment", seg + ["attention.num_landmarks=400"]))
    with pytest.raises(ConfigError, match=r"^decoder_attention\.topk=1000 must lie in \[0, \d+\] \(\d+ tokens: "):
        check_segment(compose("segment", seg + ["decoder_attention.topk=1000"]))


def test_debug_flag(monkeypatch):
    monkeypatch.delenv("MITA_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert not debug_enabled()
    monkeypatch.setenv("MITA_DEBUG", "1")
    assert debug_enabled()
    monkeypatch.setenv("MITA_DEBUG", "0")
    assert not debug_enabled()

"""mita.models.load_checkpoint: file formats, key clean-up, qkvg split, resampling, classifier mismatch."""
import argparse
import logging
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import mita.models  # noqa: F401  (registers the zoo names)
from mita.attention import ATTENTIONS
from mita.models import ZOO_MODELS, build_model, load_checkpoint, read_state_dict
from mita.models.checkpoint import CheckpointError

DEIT_TINY = dict(depth=2)


@pytest.fixture(scope="module")
def deit_state():
    """A standard-attention DeiT-Tiny (depth 2) state dict as timm builds it."""
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", **DEIT_TINY).state_dict()


def _assert_loaded(model, state, skip=()):
    model_state = model.state_dict()
    for key, value in state.items():
        if key not in skip:
            assert torch.equal(model_state[key], value), key


def test_224_checkpoint_loads_at_384(tmp_path, deit_state):
    path = tmp_path / "deit_224.pth"
    torch.save(deit_state, path)
    model = build_model("deit_tiny_patch16_224", img_size=384, **DEIT_TINY)
    missing, unexpected = load_checkpoint(model, path)
    assert missing == [] and unexpected == []
    assert model.pos_embed.shape == (1, 1 + 24 * 24, 192)
    expected = resample_abs_pos_embed(deit_state["pos_embed"], new_size=(24, 24), num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, expected)
    assert torch.equal(model.pos_embed[:, :1], deit_state["pos_embed"][:, :1])  # cls position kept apart
    _assert_loaded(model, deit_state, skip={"pos_embed"})
    assert model(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def test_deit_training_checkpoint_loads_with_weights_only(tmp_path, deit_state):
    ema = {key: value + 1 for key, value in deit_state.items()}
    args = argparse.Namespace(model="deit_tiny_patch16_224", lr=5e-4, drop_path=0.1, output_dir="out")
    path = tmp_path / "checkpoint.pth"
    torch.save(dict(model=deit_state, model_ema=ema, optimizer={"state": {}}, epoch=299, args=args), path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # the Namespace needs allow-listing
    model = build_model("deit_tiny_patch16_224", attention="mita", **DEIT_TINY)
    missing, unexpected = load_checkpoint(model, path)
    assert unexpected == []
    _assert_loaded(model, deit_state)  # `model`, not `model_ema`

    torch.save(dict(model_ema=ema, args=args), path)
    load_checkpoint(model, path)
    _assert_loaded(model, ema)


def test_untrusted_objects_are_refused(tmp_path, deit_state):
    path = tmp_path / "odd.pth"
    torch.save(dict(model=deit_state, extra=logging.getLogger("x").__class__), path)
    with pytest.raises(ValueError, match="add_safe_globals"):
        read_state_dict(path)


def test_unreadable_files_name_the_file_and_the_cause(tmp_path, deit_state):
    model = build_model("deit_tiny_patch16_224", **DEIT_TINY)
    good = tmp_path / "deit.safetensors"
    save_file({k: v.contiguous() for k, v in deit_state.items()}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:1000])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    torch.save(deit_state, tmp_path / "deit.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "deit.pth").read_bytes()[:5000])
    for name, cause in (("cut.safetensors", "not a valid safetensors file"), ("empty.safetensors", "the file is empty"),
                        ("cut.pth", "the file is truncated or corrupted")):
        with pytest.raises(CheckpointError, match=rf"^checkpoint {tmp_path / name} is unreadable: {cause}"):
            load_checkpoint(model, tmp_path / name)


def test_safetensors_and_prefixes(tmp_path, deit_state):
    path = tmp_path / "deit.safetensors"
    save_file({k: v.contiguous() for k, v in deit_state.items()}, str(path))
    model = build_model("deit_tiny_patch16_224", **DEIT_TINY)
    assert load_checkpoint(model, path) == ([], [])
    _assert_loaded(model, deit_state)

    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        path = tmp_path / "prefixed.pth"
        torch.save({"state_dict": {prefix + k: v for k, v in deit_state.items()}}, path)
        model = build_model("deit_tiny_patch16_224", **DEIT_TINY)
        assert load_checkpoint(model, path, strict=True) == ([], []), prefix
        _assert_loaded(model, deit_state)


def test_official_gate_checkpoint_splits_qkvg(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("mita_dwc_gate_deit_small_patch16_224", depth=2)
    state = source.state_dict()
    official = {}
    for key, value in state.items():
        if ".attn.gate." in key:
            continue
        if ".attn.qkv." in key:
            official[key.replace(".qkv.", ".qkvg.")] = torch.cat([value, state[key.replace(".qkv.", ".gate.")]])
        else:
            official[key] = value
    assert official["blocks.0.attn.qkvg.weight"].shape == (4 * 384, 384)
    path = tmp_path / "mita_gate.pth"
    torch.save({"model": official}, path)
    model = timm.create_model("mita_dwc_gate_deit_small_patch16_224", depth=2)
    assert load_checkpoint(model, path, strict=True) == ([], [])
    _assert_loaded(model, state)


def test_official_vit5_layer_scale_and_rope_buffers(tmp_path):
    torch.manual_seed(0)
    state = timm.create_model("vit5_small", depth=2).state_dict()
    official = {key.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for key, v in state.items()}
    for i in range(2):
        official[f"blocks.{i}.attn.rope.freqs"] = torch.ones(16)
        official[f"blocks.{i}.attn.rope_reg.freqs"] = torch.ones(16)
    path = tmp_path / "vit5.pth"
    torch.save({"model": official}, path)
    model = timm.create_model("mita_vit5_small", depth=2)
    assert load_checkpoint(model, path) == ([], [])
    _assert_loaded(model, state)


def test_classifier_mismatch_is_dropped_with_a_warning(tmp_path, deit_state, caplog):
    path = tmp_path / "deit.pth"
    torch.save(deit_state, path)
    model = build_model("deit_tiny_patch16_224", num_classes=10, **DEIT_TINY)
    with caplog.at_level(logging.WARNING, logger="mita.models.checkpoint"):
        missing, unexpected = load_checkpoint(model, path)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    assert "num_classes" in caplog.text


def test_other_shape_mismatch_raises(tmp_path, deit_state):
    path = tmp_path / "deit.pth"
    torch.save(deit_state, path)
    model = build_model("deit_tiny_patch16_224", depth=2, mlp_ratio=2.0)
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1.weight"):
        load_checkpoint(model, path)


def _swapped_models():
    for name in ATTENTIONS:
        for extra in ({}, {"dwc": True}, {"gate": True}):
            yield f"{name}{extra}", lambda n=name, e=extra: build_model(
                "deit_tiny_patch16_224", attention=n, attention_kwargs=e, **DEIT_TINY
            )
    yield "mita_learned_landmarks", lambda: build_model(
        "deit_tiny_patch16_224", attention="mita", attention_kwargs=dict(pool="learned"), **DEIT_TINY
    )
    yield "agent_bias", lambda: build_model(
        "deit_tiny_patch16_224", attention="agent", attention_kwargs=dict(agent_bias=True), **DEIT_TINY
    )
    for name in ZOO_MODELS:
        if "deit_tiny" in name:
            yield name, lambda n=name: timm.create_model(n, **DEIT_TINY)


@pytest.mark.parametrize("label,make", list(_swapped_models()), ids=[label for label, _ in _swapped_models()])
def test_standard_deit_checkpoint_loads_into_every_swapped_model(tmp_path, deit_state, label, make):
    path = tmp_path / "deit.pth"
    torch.save(deit_state, path)
    model = make()
    missing, unexpected = load_checkpoint(model, path)
    assert unexpected == []
    # Missing: exactly what the attention adds; everything timm's Attention has must load.
    assert set(missing) == set(model.state_dict()) - set(deit_state)
    timm_names = (".qkv.", ".proj.", ".q_norm.", ".k_norm.", ".norm.")
    assert all(".attn." in key and not any(n in key for n in timm_names) for key in missing), missing
    _assert_loaded(model, deit_state)

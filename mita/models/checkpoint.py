"""Load local checkpoints into the ViTs of :mod:`mita.models`, whatever attention they use.

Accepted files: DeiT training checkpoints (``{"model", "model_ema", "optimizer", "args", ...}``; the
``model`` weights are taken, ``model_ema`` only when there is no ``model``), timm/plain state dicts,
``.safetensors``, keys prefixed by ``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``), official MiTA
checkpoints (the gate variant's fused ``attn.qkvg`` [4C, C] is split into ``attn.qkv`` and ``attn.gate``;
ViT-5's ``gamma_1/2`` LayerScale and its RoPE frequency buffers are mapped or dropped).

``.pth`` files load with ``torch.load(weights_only=True)``; ``argparse.Namespace`` (DeiT's ``args``)
is allow-listed for that load only. Any other object is refused with an error that says how to
allow-list it if the file is trusted: never a silent ``weights_only=False``. A file that cannot be read
(empty, cut short, not a checkpoint, written by a newer torch) raises :class:`CheckpointError`, one line
naming the file and the cause.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["CheckpointError", "load_checkpoint", "read_state_dict", "state_dict_from", "torch_load"]

_logger = logging.getLogger(__name__)

#: globals that weights_only loading may rebuild (DeiT stores its argparse arguments in checkpoints)
SAFE_GLOBALS = [argparse.Namespace]
# Official ViT-5 attention modules keep their RoPE frequencies as buffers; ours recompute them.
_ROPE_BUFFER = re.compile(r"\.attn\.rope(_reg)?\.freqs$")
_CLASSIFIER_PREFIXES = ("head.", "head_dist.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names the file and the cause in one line."""

    def __init__(self, path: Union[str, os.PathLike], cause: str):
        self.path, self.cause = os.fspath(path), cause
        super().__init__(f"checkpoint {self.path} is unreadable: {cause}")

    def __reduce__(self):
        # rebuilt from (path, cause) when pickled (broadcast from rank 0 to the other DDP ranks)
        return type(self), (self.path, self.cause)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _unreadable_cause(path: str, err: BaseException) -> str:
    """Why ``torch.load`` failed on ``path``, from the file's size and first bytes rather than torch's words."""
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes)"
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PK\x03\x04":  # torch's zip format
        if "version" in str(err).lower():
            return f"written by another version of torch than {torch.__version__} ({_first_line(err)})"
        return f"the file is truncated or corrupted ({size} bytes; a copy cut short or a write that did not finish)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # torch's legacy pickle format
        return f"the file is truncated or corrupted ({size} bytes; {type(err).__name__}: {_first_line(err)})"
    return f"not a torch checkpoint ({size} bytes with neither a zip archive nor a pickle header)"


def torch_load(path: Union[str, os.PathLike], *, map_location: Union[str, torch.device] = "cpu",
               safe_globals: Iterable[Any] = ()):
    """``torch.load(weights_only=True)`` with :data:`SAFE_GLOBALS` and ``safe_globals`` allow-listed.

    Raises FileNotFoundError for a missing file, :class:`CheckpointError` for one that cannot be read, and
    ValueError naming the objects that weights-only loading refuses in a readable file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with torch.serialization.safe_globals(list(SAFE_GLOBALS) + list(safe_globals)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # noqa: BLE001 - no readable archive: the cause is found below
                unsafe = []
            if not unsafe:
                raise CheckpointError(path, _unreadable_cause(path, err)) from err
            raise ValueError(
                f"{path!r} holds objects that weights_only loading refuses ({unsafe}). If you trust the file, "
                f"allow-list them (torch.serialization.add_safe_globals([...]), or extra_safe_globals of "
                f"mita.engine.load_state) and load again. torch said: {_first_line(err)}"
            ) from err
        except (RuntimeError, EOFError, KeyError, IndexError, ValueError, OSError) as err:
            if isinstance(err, OSError) and not os.path.isfile(path):
                raise
            raise CheckpointError(path, _unreadable_cause(path, err)) from err


def _read_file(path: Union[str, os.PathLike]):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        if os.path.getsize(path) == 0:
            raise CheckpointError(path, "the file is empty (0 bytes)")
        try:
            return load_file(path, device="cpu")
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(path, f"not a valid safetensors file ({_first_line(err)})") from err
    return torch_load(path)


def _clean_key(key: str) -> str:
    # DDP wraps in `module.`, torch.compile in `_orig_mod.` (of the model or of any submodule).
    key = key.replace("_orig_mod.", "")
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint file as a flat ``{key: tensor}`` with clean keys
    (:func:`state_dict_from` of the file's contents)."""
    return state_dict_from(_read_file(path), path)


def state_dict_from(obj: Any, path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """The model weights in a checkpoint's contents ``obj`` (read from ``path``, named in errors).

    Picks ``model`` (then ``state_dict``, then ``model_ema``) from training checkpoints, strips
    ``module.``/``_orig_mod.`` and splits the official gate variant's ``qkvg`` into ``qkv`` + ``gate``.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"{os.fspath(path)!r} holds a {type(obj).__name__}, expected a dict of weights")
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj.get(key), Mapping):
            if key == "model_ema":
                _logger.info("%s has no `model` weights; loading `model_ema`", os.fspath(path))
            obj = obj[key]
            break
    skipped = [key for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if len(skipped) == len(obj):
        raise ValueError(f"{os.fspath(path)!r} holds no tensors at the top level or under `model`/`state_dict`")
    if skipped:
        _logger.warning("%s: ignoring entries that are not tensors: %s", os.fspath(path), skipped)
    state_dict = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = _clean_key(key)
        if ".qkvg." in key:
            # Official fused Linear(dim, 4 dim): rows [q; k; v; g].
            if value.shape[0] % 4:
                raise ValueError(f"{key} has {value.shape[0]} rows, expected 4 * dim")
            dim = value.shape[0] // 4
            state_dict[key.replace(".qkvg.", ".qkv.")] = value[: 3 * dim]
            state_dict[key.replace(".qkvg.", ".gate.")] = value[3 * dim:]
        else:
            state_dict[key] = value
    return state_dict


def adapt_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map a clean state dict (:func:`read_state_dict`) onto ``model``: timm's filter (position embeddings and
    patch kernel resampled), a classifier of another size dropped, other shape mismatches raised as ValueError.
    :func:`load_checkpoint` and the segmentation backbone load through it."""
    from timm.models import VisionTransformer
    from timm.models.vision_transformer import checkpoint_filter_fn

    state_dict = {k: v for k, v in state_dict.items() if not _ROPE_BUFFER.search(k)}
    if isinstance(model, VisionTransformer):
        # Resamples pos_embed to the model's grid (prefix tokens kept apart), the patch-embedding kernel
        # to its patch size, and renames `gamma_1/2` (DeiT-3, ViT-5) to `ls1/2.gamma`.
        state_dict = checkpoint_filter_fn(state_dict, model, adapt_layer_scale=True)
    model_state = model.state_dict()
    mismatched = []
    for key in list(state_dict):
        if key not in model_state or state_dict[key].shape == model_state[key].shape:
            continue
        if key.startswith(_CLASSIFIER_PREFIXES):
            _logger.warning(
                "dropping classifier %s from the checkpoint: shape %s, the model's is %s (different num_classes)",
                key, tuple(state_dict[key].shape), tuple(model_state[key].shape),
            )
            del state_dict[key]
        else:
            shapes = tuple(state_dict[key].shape), tuple(model_state[key].shape)
            mismatched.append(f"{key}: checkpoint {shapes[0]}, model {shapes[1]}")
    if mismatched:
        raise ValueError("checkpoint shapes do not match the model:\n  " + "\n  ".join(mismatched))
    return state_dict


def load_checkpoint(
    model: nn.Module, path: Union[str, os.PathLike], strict: bool = False, *, state: Optional[Mapping[str, Any]] = None
) -> Tuple[List[str], List[str]]:
    """Load a local checkpoint into ``model``; returns ``(missing_keys, unexpected_keys)``.

    A classifier of another size (``num_classes``) is dropped with a warning; position embeddings are
    resampled when the patch grid differs (a 224 checkpoint loads into a 384 model). Loading a
    standard-attention checkpoint into a model with another attention leaves exactly the parameters
    that attention adds (gate, dwc, landmark extractors, agent bias, ...) missing. ``state``: the file's
    contents when the caller has read them already (the file is then not read again).
    """
    weights = read_state_dict(path) if state is None else state_dict_from(state, path)
    state_dict = adapt_state_dict(weights, model)
    result = model.load_state_dict(state_dict, strict=strict)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing:
        _logger.info("%s: keys missing from the checkpoint: %s", os.fspath(path), missing)
    if unexpected:
        _logger.warning("%s: checkpoint keys the model does not have: %s", os.fspath(path), unexpected)
    return missing, unexpected

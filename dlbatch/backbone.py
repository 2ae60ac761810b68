"""Pretrained image backbones from Hugging Face ``transformers`` (the ``backbones`` extra): ResNet, ConvNeXt,
EfficientNet, MobileNet, RegNet and the other pure-PyTorch image classifiers it defines, built from their
config with a new head for the task's classes, their weights read from a local path or an object-store URI
(a ``save_pretrained`` directory, or one ``state_dict`` / safetensors file). Nothing is downloaded: a
missing file, an unknown architecture or a weight that does not fit is one line naming the file and the key.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dlbatch.errors import ConfigError

log = logging.getLogger("dlbatch")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CONFIG_FILE, PREPROCESSOR_FILE = "config.json", "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")
# Keys of a transformers config that belong to the saved model, not to the architecture.
_NOT_CARRIED = {"id2label", "label2id", "num_labels", "transformers_version", "architectures", "model_type",
                "_name_or_path"}  # fmt: skip


@dataclass(frozen=True)
class BackboneArgs:
    """A backbone's model args, as checkpoints save them: enough to rebuild it with no file at hand."""

    num_classes: int
    arch: str  # a transformers model type: resnet, convnext, efficientnet, mobilenet_v2, regnet, ...
    library_config: dict[str, Any] = field(default_factory=dict)  # its transformers config, as a dict
    in_channels: int = 3
    height: int = 224
    width: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN  # the normalization its weights were trained with
    std: tuple[float, ...] = IMAGENET_STD


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "image.model.arch names a transformers backbone: install the extra (pip install 'dlbatch[backbones]')"
        ) from None
    return transformers


def library_config(args: BackboneArgs):
    """The transformers config of the backbone, with a head for ``num_classes``."""
    auto = _transformers().AutoConfig
    try:
        config_class = type(auto.for_model(args.arch))
    except ValueError:
        raise ConfigError(
            f"image.model.arch={args.arch!r} is not a transformers model type (resnet, convnext, ...)"
        ) from None
    kept = {k: v for k, v in args.library_config.items() if k not in _NOT_CARRIED}
    return config_class(**kept, num_labels=args.num_classes)


class ImageBackbone(nn.Module):
    """A transformers image classifier behind the seed CNN's interface: uint8 or [0, 1] pixels in, logits
    out; the weights' own normalization is applied inside, so scoring needs nothing else."""

    head_prefix = "net.classifier."  # every image classifier transformers defines names its head so

    def __init__(self, args: BackboneArgs):
        super().__init__()
        self.net = _transformers().AutoModelForImageClassification.from_config(library_config(args))
        self.register_buffer("mean", torch.tensor(args.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(args.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().mul_(1 / 255)
        return self.net(pixel_values=(x - self.mean) / self.std).logits


def _read(uri: str, with_weights: bool = True) -> tuple[dict[str, bytes], str]:
    """The weight source's files: a directory's config files and its first weights file, or the one file
    (under "weights"); ``with_weights=False`` reads the config files only (a weights file can be GBs).
    Returns (files, the path of the weights file)."""
    import pyarrow.fs as pafs

    from dlbatch.data import resolve_path

    fs, path = resolve_path(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"image.model.weights: {uri}: no such file or directory")

    def read(p: str) -> bytes:
        with fs.open_input_file(p) as f:
            return f.read()

    if info.type == pafs.FileType.File:
        return ({"weights": read(path)} if with_weights else {}), uri
    present = {name for name in (CONFIG_FILE, PREPROCESSOR_FILE, *WEIGHT_FILES)
               if fs.get_file_info(f"{path}/{name}").type == pafs.FileType.File}  # fmt: skip
    found = [name for name in WEIGHT_FILES if name in present]
    if not found:
        raise ConfigError(f"image.model.weights: {uri}: no {' or '.join(WEIGHT_FILES)} in the directory")
    files = {name: read(f"{path}/{name}") for name in (CONFIG_FILE, PREPROCESSOR_FILE) if name in present}
    if with_weights:
        files["weights"] = read(f"{path}/{found[0]}")
    return files, f"{uri.rstrip('/')}/{found[0]}"


def _tensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """A state_dict from safetensors or torch.save bytes; torch's with weights_only (never unpickled code)."""
    try:
        if data[8:9] == b"{":  # safetensors: an 8-byte header length, then its JSON header
            from safetensors.torch import load

            return load(data)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"image.model.weights: {where}: not a state_dict or safetensors file ({first})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"image.model.weights: {where}: not a state_dict (a mapping of names to tensors)")
    return state


def backbone_args(model_cfg, image_cfg, num_classes: int) -> BackboneArgs:
    """A backbone's args from the config and, when the weights are a directory, its config.json (the
    architecture) and preprocessor_config.json (the normalization)."""
    library, mean, std = {}, IMAGENET_MEAN, IMAGENET_STD
    if model_cfg.weights:
        files, _ = _read(model_cfg.weights, with_weights=False)
        if CONFIG_FILE in files:
            library = json.loads(files[CONFIG_FILE])
            if library.get("model_type") not in (None, model_cfg.arch):
                raise ConfigError(
                    f"image.model.weights: {model_cfg.weights}/{CONFIG_FILE} is a {library['model_type']} "
                    f"model, not image.model.arch={model_cfg.arch}"
                )
        if PREPROCESSOR_FILE in files:
            pre = json.loads(files[PREPROCESSOR_FILE])
            mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
            _say_size(pre, image_cfg)
    if image_cfg.channels != 3 and (mean, std) == (IMAGENET_MEAN, IMAGENET_STD):
        mean, std = (0.5,) * image_cfg.channels, (0.5,) * image_cfg.channels
    library = {**library, "num_channels": library.get("num_channels", image_cfg.channels)}
    if library["num_channels"] != image_cfg.channels:
        raise ConfigError(
            f"image.model.weights: {model_cfg.weights} takes {library['num_channels']}-channel images; "
            f"set image.image.channels={library['num_channels']}"
        )
    return BackboneArgs(num_classes, model_cfg.arch, library, image_cfg.channels, image_cfg.height,
                        image_cfg.width, mean, std)  # fmt: skip


def _say_size(pre: dict[str, Any], image_cfg) -> None:
    size = pre.get("crop_size") or pre.get("size") or {}
    trained = (
        (size.get("height"), size.get("width")) if "height" in size else (size.get("shortest_edge"),) * 2
    )
    if trained[0] and trained != (image_cfg.height, image_cfg.width):
        log.warning(
            "image: the backbone's weights were made for %sx%s inputs; images go in at %dx%d (set "
            "image.image.height and image.image.width to match)", trained[0], trained[1], image_cfg.height,
            image_cfg.width,
        )  # fmt: skip


def pretrained_state(model: ImageBackbone, uri: str) -> dict[str, torch.Tensor]:
    """The weights at ``uri`` as they load into ``model``, less a head made for another number of classes
    (the task's own is new). A key that is missing, unexpected or of another shape is one line naming the
    file and the key. ``model`` may be on the meta device (the driver's check before a fit)."""
    files, where = _read(uri)
    state = _tensors(files["weights"], where)
    own, arch = model.net.state_dict(), model.net.config.model_type
    prefix = model.net.base_model_prefix
    named = {k: k for k in state}  # the model's key -> the file's
    if prefix and not any(k.startswith(f"{prefix}.") for k in state):
        named = {f"{prefix}.{k}": k for k in state}  # a base model's weights, without a head
        state = {f"{prefix}.{k}": v for k, v in state.items()}
    head = ImageBackbone.head_prefix.removeprefix("net.")
    for key, value in state.items():
        if key not in own:
            raise ConfigError(
                f"image.model.weights: {where}: key {named[key]!r} is not in a {arch} model like this one"
            )
        if value.shape != own[key].shape and not key.startswith(head):
            raise ConfigError(
                f"image.model.weights: {where}: key {named[key]!r} has shape {tuple(value.shape)}, the model's is "
                f"{tuple(own[key].shape)} (another size of {arch}?)"
            )
    missing = [k for k in own if k not in state and not k.startswith(head)]
    if missing:
        raise ConfigError(f"image.model.weights: {where}: key {missing[0]!r} is missing")
    return {k: v for k, v in state.items() if v.shape == own[k].shape}


def check_weights(model_args: dict[str, Any], uri: str) -> None:
    """Fail before a fit starts when the weights do not fit the backbone (built on the meta device: no
    memory for its parameters)."""
    from dlbatch.models import build_model

    with torch.device("meta"):
        model = build_model("image", model_args)
    pretrained_state(model, uri)


def load_pretrained(model: ImageBackbone, uri: str) -> None:
    model.net.load_state_dict(pretrained_state(model, uri), strict=False)

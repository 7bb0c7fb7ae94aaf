"""The networks flywheel trains, by name: a small ResNet for tiny images, and the standard
backbones of torchvision and timm, optionally started from the user's own pretrained weights (a
local file: nothing is downloaded at run time).

Every network takes the ONNX contract's input, uint8 `[N, H, W, 3]`, normalises it inside its own
graph with its backbone's pixel statistics, and has `embed` (pooled features, for drift and the
head) and `head` (a linear layer for the project's classes)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.config import ModelConfig, backbone_source

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The small ResNet's pixel statistics (a scalar for every channel): part of its graph since the
# first release, so its stored weights keep their meaning.
SMALL_RESNET_MEAN, SMALL_RESNET_STD = 0.5, 0.25


class Classifier(nn.Module):
    """uint8 `[N, H, W, 3]` -> logits `[N, num_classes]`. Subclasses give `features` (normalised
    float NCHW -> pooled `[N, F]`) and `backbone_modules` (what a frozen phase freezes)."""

    head: nn.Linear

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], test_time_flip: bool):
        super().__init__()
        self.test_time_flip = test_time_flip
        # Not persistent: the state dict holds the learned weights only, named as the library names them.
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1) * 255.0, persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backbone_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()  # NCHW shape with channels_last strides, what GPU kernels prefer
        if not x.is_cuda:
            # A contiguous NCHW copy on CPUs. In channels_last, in torch 2.13's oneDNN 3.12, the AVX2
            # `jit_1x1` backward-weights kernel of a strided 1x1 convolution (the shortcut of a stage)
            # with fewer than 8 input channels segfaulted, corrupted the heap or hung at >= 32 px; the
            # plain layout runs oneDNN's blocked kernels (tests/test_training.py runs every small width).
            x = x.contiguous(memory_format=torch.contiguous_format)
        return self.features((x - self.pixel_mean) / self.pixel_std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.embed(images))
        if self.test_time_flip and not self.training:  # part of the evaluated and the exported graph
            logits = (logits + self.head(self.embed(images.flip(2)))) / 2
        return logits


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_channels == out_channels
            else nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(Classifier):
    """`resnet_small`: a ResNet-8 (at `blocks_per_stage` 1) with a stride-1 stem, for images of
    8-64 px such as scanned digits; trained from scratch."""

    def __init__(self, config: ModelConfig):
        super().__init__((SMALL_RESNET_MEAN,) * 3, (SMALL_RESNET_STD,) * 3, config.test_time_flip)
        width = config.width
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, channels = [], width
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            for block in range(config.blocks_per_stage):
                blocks.append(BasicBlock(channels, out_channels, stride=2 if stage > 0 and block == 0 else 1))
                channels = out_channels
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Linear(4 * width, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def backbone_modules(self) -> list[nn.Module]:
        return [self.stem, self.stages]


class LibraryBackbone(Classifier):
    """A torchvision or timm classification network whose own classifier is replaced by `head`.
    `body` keeps the library's module names, so its state dict is the published checkpoint's
    without the classifier."""

    def __init__(self, config: ModelConfig):
        library, name = backbone_source(config.backbone)
        if library == "timm":
            import timm

            body = timm.create_model(name, pretrained=False)
            pretrained_cfg = body.pretrained_cfg
            mean, std = tuple(pretrained_cfg.get("mean", IMAGENET_MEAN)), tuple(pretrained_cfg.get("std", IMAGENET_STD))
            classifier = pretrained_cfg.get("classifier", "")
            body.reset_classifier(0)  # pooled features out
            features = body.num_features
        else:
            from torchvision.models import get_model

            body = get_model(name, weights=None)
            mean, std = IMAGENET_MEAN, IMAGENET_STD  # every torchvision classification weight uses them
            classifier, last = _last_linear(body)
            features = last.in_features
            body.set_submodule(classifier, nn.Identity())
        super().__init__(mean, std, config.test_time_flip)
        self.body = body
        self.classifier_name = classifier  # the published checkpoint's keys that `head` replaces
        self.head = nn.Linear(features, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def backbone_modules(self) -> list[nn.Module]:
        return [self.body]


def _last_linear(network: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier of a torchvision network: its last `nn.Linear` (`fc` of a ResNet or RegNet,
    `classifier.3` of a MobileNetV3, `classifier.1` of an EfficientNet, `classifier.2` of a ConvNeXt)."""
    linears = [(name, module) for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(network).__name__} has no linear classifier to replace")
    return linears[-1]


def build_network(config: ModelConfig) -> Classifier:
    """The untrained network `config.backbone` names (weights from `load_pretrained` or a champion)."""
    network = SmallResNet(config) if config.backbone == "resnet_small" else LibraryBackbone(config)
    if config.batchnorm_momentum is not None:
        for module in network.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = config.batchnorm_momentum
    return network


class PretrainedWeightsError(ValueError):
    """The configured pretrained weights are missing or do not fit the backbone: a user's error."""


def load_pretrained(network: Classifier, path: Path, backbone: str) -> list[str]:
    """Load a published checkpoint of the backbone's library (`.safetensors`, or `.pth` read with
    `weights_only=True`) into `network.body`. Every weight but the library's classifier must be
    there with its published name and shape; the classifier is dropped (the head is the project's
    own). Returns the dropped classifier keys."""
    if not isinstance(network, LibraryBackbone):
        raise PretrainedWeightsError(f"backbone {backbone} trains from scratch: it has no published pretrained weights")
    if not path.is_file():
        raise PretrainedWeightsError(missing_weights_message(backbone, path))
    state = _read_checkpoint(path)
    own = network.body.state_dict()
    dropped = sorted(key for key in state if key.startswith(f"{network.classifier_name}.") and key not in own)
    unexpected = sorted(set(state) - set(own) - set(dropped))
    missing = sorted(set(own) - set(state))
    reshaped = sorted(key for key in set(own) & set(state) if own[key].shape != state[key].shape)
    if missing or unexpected or reshaped:
        problems = [
            f"{len(found)} {what} (first: {found[0]})"
            for what, found in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)) if found
        ]
        raise PretrainedWeightsError(
            f"{path} does not fit backbone {backbone}: weights {', '.join(problems)}; "
            f"it must be a checkpoint of {'/'.join(backbone_source(backbone))} with the library's own names"
        )
    network.body.load_state_dict({key: value for key, value in state.items() if key in own})
    return dropped


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PretrainedWeightsError(f"{path} is not a readable .pth checkpoint of tensors: {error}") from error
    for wrapper in ("state_dict", "model"):  # training scripts often nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise PretrainedWeightsError(f"{path} holds no state dict of tensors")
    return state


def missing_weights_message(backbone: str, path: Path) -> str:
    """One line: which file to fetch, from where, and where to put it."""
    library, name = backbone_source(backbone)
    if library == "timm":
        import timm

        cfg = timm.get_pretrained_cfg(name)
        source = (
            f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors" if cfg and cfg.hf_hub_id
            else (cfg.url if cfg and cfg.url else f"a checkpoint of timm's {name}")
        )
    else:
        from torchvision.models import get_model_weights

        source = get_model_weights(name).DEFAULT.url
    return f"pretrained weights for backbone {backbone} not found at {path}: download {source} and save it as {path}"


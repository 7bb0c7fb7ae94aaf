"""The classifier: a network that takes the ONNX contract's input (uint8 NHWC) and normalises inside
its own graph, and the LightningModule that trains it."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from training.config import ModelConfig, OptimConfig

# Pixel statistics the network normalises with; part of the graph, so every consumer gets them.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


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


class ImageClassifier(nn.Module):
    """uint8 `[N, H, W, 3]` -> logits `[N, num_classes]`; `embed` gives the penultimate features."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.width
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, channels = [], width
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            for block in range(config.blocks_per_stage):
                blocks.append(BasicBlock(channels, out_channels, stride=2 if stage > 0 and block == 0 else 1))
                channels = out_channels
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Linear(4 * width, config.num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        # NHWC -> NCHW as a contiguous copy. The permuted view alone has channels_last strides, which
        # sends every convolution down oneDNN's nhwc kernels; in torch 2.13's oneDNN 3.12 the AVX2
        # `jit_1x1` backward-weights kernel of a strided 1x1 convolution (the shortcut of a stage) with
        # fewer than 8 input channels segfaults, corrupts the heap or hangs at >= 32 px (width 4 at
        # 32 px; widths 4-7 at 64 px). The plain NCHW layout runs oneDNN's blocked kernels, which are
        # correct for every width (tests/test_training.py runs each one).
        x = images.permute(0, 3, 1, 2).contiguous(memory_format=torch.contiguous_format).float()
        x = (x / 255.0 - PIXEL_MEAN) / PIXEL_STD
        x = self.stages(self.stem(x))
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))


class LitClassifier(L.LightningModule):
    def __init__(self, model: dict, optim: dict, compile: bool = False):
        super().__init__()
        # Plain dicts, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters()
        self.model_config = ModelConfig.model_validate(model)
        self.optim_config = OptimConfig.model_validate(optim)
        self.net = ImageClassifier(self.model_config)
        if compile:
            self.net.compile()  # in place: state_dict keys stay those of the plain network
        self.train_accuracy = MulticlassAccuracy(self.model_config.num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(self.model_config.num_classes, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.train_accuracy(logits, labels)
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/accuracy", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_accuracy(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), on_epoch=True, sync_dist=True)
        self.log("val/accuracy", self.val_accuracy, on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        config = self.optim_config
        if config.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(), lr=config.learning_rate, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        if config.schedule == "constant":
            return optimizer
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = (
            torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, total_steps=total_steps)
            if config.schedule == "onecycle"
            else torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

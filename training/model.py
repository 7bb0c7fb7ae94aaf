"""The LightningModule that trains a classifier (`training.backbones`), and the recipe's own
callbacks: a frozen first phase and growing crops."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from training.backbones import build_network
from training.config import ModelConfig, OptimConfig


class LitClassifier(L.LightningModule):
    def __init__(
        self, model: dict, optim: dict, compile: bool = False, label_smoothing: float = 0.0, teacher: torch.nn.Module | None = None,
    ):
        super().__init__()
        # Plain dicts, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["teacher"])
        self.model_config = ModelConfig.model_validate(model)
        self.optim_config = OptimConfig.model_validate(optim)
        self.label_smoothing = label_smoothing
        self.net = build_network(self.model_config)
        if compile:
            self.net.compile()  # in place: state_dict keys stay those of the plain network
        self.train_accuracy = MulticlassAccuracy(self.model_config.num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(self.model_config.num_classes, average="micro")
        self.val_loss = MeanMetric()  # weighted by batch size and summed across ranks: exact under DDP
        # Not a submodule: never trained, checkpointed, averaged or put in train mode (its BatchNorm
        # statistics stay the champion's); a resumed attempt rebuilds it from the same weights file.
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False) if teacher is not None else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def distillation_loss(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Hinton's soft-target loss toward the teacher, on the examples the teacher classifies right:
        elsewhere (a drifted batch it gets wrong) the labels alone teach. Averaged over the whole batch."""
        temperature = self.optim_config.distillation_temperature
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        right = teacher_logits.argmax(dim=1) == labels
        divergence = F.kl_div(
            F.log_softmax(logits[right] / temperature, dim=1), F.log_softmax(teacher_logits[right] / temperature, dim=1),
            reduction="sum", log_target=True,
        )
        return divergence * temperature**2 / len(labels)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if self.teacher is not None:
            distillation = self.distillation_loss(images, labels, logits)
            self.log("train/distillation_loss", distillation, on_step=False, on_epoch=True, sync_dist=True)
            loss = loss + self.optim_config.distillation * distillation
        self.train_accuracy(logits, labels)
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/accuracy", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_accuracy(logits, labels)
        self.val_loss(F.cross_entropy(logits, labels), weight=len(labels))
        self.log("val/loss", self.val_loss, on_epoch=True)
        self.log("val/accuracy", self.val_accuracy, on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        config = self.optim_config
        # Two groups from the start, so a frozen phase needs no optimizer surgery: frozen weights get
        # no gradient, and the optimizer skips them until `FreezeBackbone` thaws them.
        head = list(self.net.head.parameters())
        head_ids = {id(parameter) for parameter in head}
        backbone = [parameter for parameter in self.net.parameters() if id(parameter) not in head_ids]
        # The recipe's rate is for `reference_batch`; more processes or accumulation scale it: linearly
        # for SGD, by the square root for AdamW (adaptive steps; timm's rule).
        global_batch = config.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
        ratio = global_batch / config.reference_batch
        learning_rate = config.learning_rate * (ratio if config.optimizer == "sgd" else ratio**0.5)
        rates = [learning_rate, learning_rate * config.backbone_lr_ratio]
        groups = [{"params": head, "lr": rates[0]}, {"params": backbone, "lr": rates[1]}]
        if config.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        if config.schedule == "constant":
            return optimizer
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = (
            torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=rates, total_steps=total_steps)
            if config.schedule == "onecycle"
            else torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class FreezeBackbone(BaseFinetuning):
    """Trains only the head for the first `epochs` epochs (the backbone's weights frozen, its
    BatchNorm running statistics not updated), then the whole network. Idempotent per epoch, so a run resumed in
    either phase continues in that phase."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def freeze_before_training(self, pl_module: LitClassifier) -> None:
        self.freeze(pl_module.net.backbone_modules(), train_bn=False)

    def finetune_function(self, pl_module: LitClassifier, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if epoch >= self.epochs:
            self.make_trainable(pl_module.net.backbone_modules())


class ProgressiveResizing(L.Callback):
    """Random resized crops start small and grow linearly to the model's resolution, reached at
    three quarters of the epochs (FFCV's ImageNet recipe): early epochs are cheaper, and the last
    ones train at the resolution the model is served at."""

    def __init__(self, start: int, end: int, epochs: int):
        self.start, self.end = start, end
        self.full_at = max(1, round(0.75 * epochs) - 1)

    def resolution(self, epoch: int) -> int:
        if epoch >= self.full_at:
            return self.end
        grown = self.start + (self.end - self.start) * epoch / self.full_at
        return max(8, round(grown / 8) * 8)  # multiples of 8 suit the convolution kernels

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        size = self.resolution(trainer.current_epoch)
        trainer.datamodule.crop_decoder.output_size = (size, size)

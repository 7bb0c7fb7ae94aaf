"""Typed configuration of a training run: what the `fit` entry point receives as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


# FFCV compiles a loader's pipeline with numba (3-40 s per loader, per process: nothing of it is
# cached) and then loads ~25-55 us per image faster than running it as Python on small images, and
# no faster with random resized crops at 224 px (bench/loader_compile.py). So a loader is compiled
# only when it will deliver at least this many images (examples x epochs): a tick's training and
# evaluation on small data skip seconds of compilation; a real dataset's training compiles.
LOADER_COMPILE_MIN_IMAGES = 100_000


class KubernetesConfig(BaseModel):
    """The pods of a training on Kubernetes (`training.kubernetes`): num_nodes pods of devices processes each."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field("", description="The container image: this project installed as `make setup` does (same code, same venv).")
    namespace: str = Field("default", description="Namespace of the Job and its Service.")
    volume_claim: str = Field(
        "", description="PersistentVolumeClaim holding the data root; mounted in every pod at the data root's path on the Dagster host.",
    )
    cpus_per_node: str = Field("4", description="CPU request and limit of each pod (Kubernetes quantity).")
    memory_per_node: str = Field("16Gi", description="Memory request and limit of each pod (Kubernetes quantity).")
    gpus_per_node: int = Field(0, ge=0, description="nvidia.com/gpu limit of each pod; devices processes share them.")
    service_account: str = Field("", description="Service account of the pods; empty: the namespace's default.")
    env_secret: str = Field("", description="A Secret whose keys become the pods' environment (e.g. WANDB_API_KEY); empty: none.")


class ComputeConfig(BaseModel):
    """Where and how training runs. GPU settings are configuration; the code never assumes one."""

    model_config = ConfigDict(extra="forbid")

    accelerator: str = Field("auto", description="Lightning accelerator: auto picks cuda when present, else cpu.")
    devices: int | str = Field("auto", description="Devices per node; processes per node follow it under torchrun.")
    num_nodes: int = Field(1, ge=1, description="Machines taking part (torchrun --nnodes).")
    strategy: str = Field("auto", description="Lightning strategy; ddp whenever more than one process runs.")
    precision: str | None = Field(
        None,
        description="None picks per accelerator: 32-true on CPU (bf16 autocast is slower there), "
        "bf16-mixed on GPUs that support it, else 16-mixed.",
    )
    compile: bool | None = Field(
        None, description="torch.compile the network. None: on GPUs (where it pays off), not on CPUs (where the "
        "compile time exceeds what it saves on short runs).",
    )
    sync_batchnorm: bool = Field(False, description="Synchronise BatchNorm statistics across processes (small per-GPU batches).")
    num_workers: int | None = Field(
        None, ge=1, description="FFCV loader threads per process. None: the CPU cores the process may use, shared "
        "evenly by the node's training processes (a GPU's loader decodes and augments on them).",
    )
    loader_compile_min_images: int = Field(
        LOADER_COMPILE_MIN_IMAGES, ge=0, description="Compile the training loaders' pipelines with numba only when they "
        "deliver at least this many images (examples x epochs); 0: always.",
    )
    launcher: Literal["torchrun", "ray", "kubernetes"] = Field(
        "torchrun", description="torchrun: training processes on this machine (devices x num_nodes); ray: a Ray Train "
        "job of `workers` processes on the cluster at ray_address (the data root on storage every node mounts); "
        "kubernetes: num_nodes pods of devices processes each (`kubernetes`).",
    )
    ray_address: str = Field(
        "", description="The Ray cluster for launcher ray: its GCS address host:port (what `ray start --head` prints) "
        "or ray://host:10001 (Ray Client, from outside the cluster).",
    )
    workers: int = Field(2, ge=1, description="Training processes of a Ray Train job (one DDP rank each).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each Ray worker reserves; its FFCV loader threads follow it.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each Ray worker reserves: 0 trains on CPUs (gloo), 1 on a GPU each (NCCL).")
    max_failures: int = Field(
        2, ge=0, description="Times Ray restarts the workers after one dies, each time from the last epoch's checkpoint.",
    )

    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig, description="The pods, for launcher kubernetes.")

    @model_validator(mode="after")
    def _launcher_settings(self) -> "ComputeConfig":
        if self.launcher == "ray" and not self.ray_address:
            raise ValueError("launcher ray needs ray_address: the cluster's host:port or ray://host:10001")
        if self.launcher == "kubernetes" and not (self.kubernetes.image and self.kubernetes.volume_claim):
            raise ValueError("launcher kubernetes needs kubernetes.image and kubernetes.volume_claim (the data root's volume)")
        return self


# Backbones by name: (library, the library's name). Any other network of either library is
# `timm/<name>` or `torchvision/<name>`.
BACKBONES: dict[str, tuple[str, str]] = {
    "resnet_small": ("flywheel", "resnet_small"),  # a ResNet-8 with a stride-1 stem, for 8-64 px
    "resnet18": ("torchvision", "resnet18"),
    "resnet50": ("torchvision", "resnet50"),
    "mobilenetv3_small": ("torchvision", "mobilenet_v3_small"),
    "mobilenetv3_large": ("torchvision", "mobilenet_v3_large"),
    "efficientnet_b0": ("timm", "efficientnet_b0"),
    "convnext_tiny": ("timm", "convnext_tiny"),
    "regnety_008": ("timm", "regnety_008"),
}


def backbone_source(backbone: str) -> tuple[str, str]:
    """(library, name) of a backbone: a catalogue name, or `timm/<name>` / `torchvision/<name>`."""
    if backbone in BACKBONES:
        return BACKBONES[backbone]
    library, _, name = backbone.partition("/")
    if library in ("timm", "torchvision") and name:
        return library, name
    raise ValueError(
        f"unknown backbone {backbone!r}: one of {', '.join(BACKBONES)}, or timm/<name> or torchvision/<name>"
    )


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: str = Field(
        "resnet_small",
        description=f"The network: {', '.join(BACKBONES)}, or any timm/<name> or torchvision/<name>. "
        "resnet_small suits images up to ~64 px; the others are the standard ImageNet backbones.",
    )
    pretrained: Path | None = Field(
        None,
        description="A published checkpoint of the backbone's library (.safetensors, or .pth) to start from; "
        "its classifier is replaced by the project's head. Nothing is downloaded: a missing file says what to fetch.",
    )
    width: int = Field(32, ge=4, description="resnet_small: channels of the first stage; later stages double it.")
    blocks_per_stage: int = Field(1, ge=1, description="resnet_small: residual blocks in each of its three stages (1: ResNet-8).")
    num_classes: int = Field(10, ge=2, description="Labels are 0 .. num_classes - 1 (10 for the digits default).")
    resolution: int = Field(32, ge=8, le=1024, description="Square training and serving resolution in pixels (H = W).")
    batchnorm_momentum: float | None = Field(
        0.1, gt=0, le=1, description="Momentum of every BatchNorm's running statistics (PyTorch's default; None: the "
        "library's). torchvision's MobileNetV3 ships 0.01, meant for ImageNet's ~450k steps: after a few hundred steps its "
        "statistics are still near their start, and evaluation, which uses them, is at chance (README: Backbones).",
    )
    test_time_flip: bool = Field(False, description="Average the logits of each image and its mirror image (validation, evaluation and the served model).")

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, backbone: str) -> str:
        backbone_source(backbone)
        return backbone


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Measured on 560 training digits, tested on 1,117 (seeds 0/1/2): 8 epochs 0.969/0.953, 12 0.985/0.975,
    # 16 0.990/0.990/0.993, 24 0.993, each 8 epochs ~25 s more on two CPU cores.
    epochs: int = Field(16, ge=1, description="Enough for >= 0.99 test accuracy on the digits default.")
    batch_size: int = Field(64, ge=1, description="Per process; the global batch is this times the world size.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW, or SGD with Nesterov momentum 0.9.")
    schedule: Literal["onecycle", "cosine", "constant"] = Field("onecycle", description="Learning-rate schedule, stepped per batch.")
    learning_rate: float = Field(3e-3, gt=0, description="Peak learning rate at a global batch of reference_batch.")
    reference_batch: int = Field(
        64, ge=1, description="The global batch learning_rate is meant for; the rate follows the real one (batch_size x "
        "processes x accumulate_grad_batches): linearly for SGD, by its square root for AdamW, so adding GPUs keeps the recipe.",
    )
    accumulate_grad_batches: int = Field(1, ge=1, description="Batches whose gradients add up to one optimizer step.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop when validation accuracy has not improved for this many epochs (None: run every epoch).",
    )
    weight_decay: float = Field(5e-4, ge=0, description="Decoupled weight decay (AdamW) or L2 (SGD).")
    freeze_epochs: int = Field(
        0, ge=0, description="First phase: epochs that train only the head, the backbone frozen (pretrained weights); "
        "the remaining epochs fine-tune everything.",
    )
    backbone_lr_ratio: float = Field(
        1.0, gt=0, le=1, description="The backbone's learning rate relative to the head's (discriminative rates; "
        "~0.1 when fine-tuning pretrained weights).",
    )
    seed: int = Field(0, description="Same data, config and seed -> same training attempt (resumable).")
    distillation: float = Field(
        0.0, ge=0, description="Weight of a distillation loss toward the warm start's own predictions, on the training "
        "examples it classifies right (0: off): a fine-tuned model keeps what it knew where it knew it.",
    )
    distillation_temperature: float = Field(2.0, gt=0, description="Softmax temperature of the distillation loss (Hinton et al.).")


class AugmentConfig(BaseModel):
    """How the training images are varied, in FFCV's pipeline on the loader's threads (the shapes of
    FFCV's own CIFAR and ImageNet recipes). Validation and test images are seen as stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    random_resized_crop: bool = Field(False, description="Decode a random crop (area in crop_scale, aspect 3:4-4:3) resized to the resolution.")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="Area range of the random crops, as a share of the image.")
    horizontal_flip: bool = Field(False, description="Mirror half the images; for photos, never for digits or text.")
    translate: int = Field(0, ge=0, description="Shift by up to this many pixels (zero fill).")
    cutout: int = Field(0, ge=0, description="Blank a square of this side at a random place (Cutout).")
    color_jitter: float = Field(
        0.0, ge=0, lt=1, description="Photometric variety: brightness, contrast and saturation each scaled by a random "
        "factor in [1 - this, 1 + this], each for half the images (0: off; ~0.4 for photos from varied cameras and light).",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Share of each label's probability spread over the other classes.")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="Validate and ship an exponential moving average of the weights with this decay (0: off; ~0.999 for long runs).")
    start_resolution: int | None = Field(
        None, ge=8, description="Progressive resizing (needs random_resized_crop): the first epoch's crops at this size, growing "
        "linearly to the model's resolution by three quarters of the epochs.",
    )

    @model_validator(mode="after")
    def _progressive_needs_crops(self) -> "AugmentConfig":
        if self.start_resolution is not None and not self.random_resized_crop:
            raise ValueError("start_resolution (progressive resizing) needs random_resized_crop: true")
        return self


class IncrementalConfig(BaseModel):
    """An incremental retraining: the champion fine-tuned on the batches it has not trained on and a
    class-balanced replay sample of the rest, so its cost follows the new data, not the history."""

    model_config = ConfigDict(extra="forbid")

    # Measured on make run's second tick (289 new training digits, inverted; 1,149 in the history; 147 test
    # images; in one process): the full 16-epoch retraining 0.973 in 152 s; incremental, 16 epochs at a third
    # of the rate, 0.986 in 75 s. Fewer epochs are fewer steps, and a small batch then barely moves the
    # weights: 6 epochs gave 0.980 here (54 steps) but 0.04 on bench/incremental.py's 105-image new batch (18 steps).
    # With each new row seen twice per epoch (new_passes), 10 epochs are 20 passes over the new batch; on one
    # champion of bench/incremental.py (4,683 test images; overall, new batch, history) at a third of the rate:
    # 10 epochs (0.9868, 0.937, 0.9892) in 49 s against a young project's full retraining's 36-39 s (1.3x);
    # 16 epochs (0.9891, 0.960, 0.9906) in 68-73 s (1.7-2.0x: over the 1.5x budget).
    epochs: int | None = Field(
        10, ge=1, description="Epochs of an incremental retraining, at most the training's own (None: the training's own).",
    )
    # bench/incremental.py (20 batches of history, a new inverted batch of 105 training images, 16 epochs,
    # 4,683 test images; full retraining: new batch 0.955-0.96, history 0.997): replaying 3x at a fifth of the
    # rate 0.987 overall, at a third 0.982 (new batch 0.90 and 0.87). On one champion, a fifth forgot less
    # (history 0.994 against 0.991) and learned the new batch less (0.88 against 0.93); an EMA of the weights
    # changed nothing. Run-to-run spread is of the same size as these differences.
    # With new_passes 2 and 10 epochs, a fifth of the rate learned the new batch less: (0.9829, 0.830, 0.9906).
    learning_rate_scale: float = Field(
        1 / 3, gt=0, le=1, description="Its peak learning rate relative to the training's: the weights are already trained.",
    )
    # On 483 test images, at a third of the rate: replaying 1x 0.971 (history 0.973), 2x 0.988 (0.989), 3x 0.986.
    replay_ratio: float = Field(
        3.0, ge=0, description="History examples replayed per new example, class-balanced (all of the history when it is smaller).",
    )
    # On one champion of bench/incremental.py (4,683 test images; as overall, new batch, history), 3x replay
    # at a fifth of the rate: each new row once (0.9887, 0.892, 0.9935), twice (0.9893, 0.942, 0.9917); at a
    # third, twice (0.9891, 0.960, 0.9906): a full retraining's 0.96 on the new batch. 2x replay with new rows
    # twice (the same rows per epoch as 3x once) forgot more: history 0.985-0.987.
    new_passes: int = Field(
        2, ge=1, description="Times each new example is seen per epoch: the new batch weighs more against the replay.",
    )

    # On one champion of bench/incremental.py (4,683 test images; overall, new batch, history; full retraining
    # 0.9949, 0.937, 0.9978), runs of the same setting differing as much as settings: off (0.9831, 0.928, 0.9859)
    # and (0.9763, 0.861, 0.9821), classes 5 and 9 significantly worse than full in both; 0.5 (0.9904, 0.915,
    # 0.9942), none worse, and (0.9865, 0.874, 0.9922), class 9; 1 (0.9904, 0.883, 0.9957) and (0.9906, 0.883,
    # 0.9960), none worse; 3 (0.9893, 0.807, 0.9984), the new batch significantly worse. Whole bench runs (own
    # champion each; overall full / incremental, new batch full / incremental): off 0.9957 / 0.9855, 0.955 /
    # 0.955, classes 3 and 9 worse; 1: 0.9957 / 0.9840, 0.964 / 0.821, the new batch and class 9 worse; 0.5:
    # 0.9912 / 0.9844, 0.901 / 0.888, none worse. 0.5 stayed within a point of full in all three of its runs.
    # The teacher's forward pass costs ~10% of the training (27.3 s against 30.3 s).
    distillation: float = Field(
        0.5, ge=0, description="Weight of the distillation loss toward the champion's predictions on the examples it "
        "classifies right (0: off): what the new batch does not contradict is kept, not relearned from the replay sample.",
    )

    def fine_tune(self, training: OptimConfig) -> OptimConfig:
        """The training's optimisation at this rate scale, for these epochs but never more than the
        training's own (a short configured training stays short), distilling the champion it starts from."""
        epochs = min(self.epochs, training.epochs) if self.epochs else training.epochs
        return training.model_copy(update={
            "epochs": epochs, "learning_rate": training.learning_rate * self.learning_rate_scale, "distillation": self.distillation,
        })


# Named augmentation recipes; a run's own settings override a recipe's.
RECIPES: dict[str, AugmentConfig] = {
    "none": AugmentConfig(),
    # Scans and small images whose orientation carries meaning (digits): small shifts only. Measured
    # on make run's digits: cutout and label smoothing cost accuracy or calibration (the promotion
    # gate's ECE bound) at 8 epochs (the default then), and each FFCV transform adds ~4-6 s of numba compilation.
    "small_images": AugmentConfig(translate=2),
    # Photographs (FFCV's ImageNet recipe): random resized crops, flips, label smoothing.
    "photos": AugmentConfig(random_resized_crop=True, crop_scale=(0.25, 1.0), horizontal_flip=True, label_smoothing=0.1),
}


# What `training.fit` writes into `FitConfig.run_dir` when rank 0 finishes; the orchestrator reads it.
RESULT_FILE = "result.json"
# What `training.tune` writes into the study's folder: the best values, every trial, the plots.
TUNED_FILE = "tuned.json"


class FitConfig(BaseModel):
    """Everything `training.fit` needs; written to JSON by the orchestrator, read by every rank."""

    model_config = ConfigDict(extra="forbid")

    beton_dir: Path = Field(description="Folder with train.beton and val.beton.")
    run_dir: Path = Field(description="This training attempt's folder: checkpoints, result.json.")
    wandb_save_dir: Path = Field(description="W&B writes its runs to <this>/wandb (the data root).")
    wandb_project: str = "flywheel"
    run_name: str = "train"
    wandb_group: str | None = Field(None, description="W&B group of the run (a tuning study's trials share one).")
    tags: dict[str, str] = Field(default_factory=dict, description="Short labels for the W&B run (64 characters each).")
    reason: str = Field("manual", description="Why this training runs (the retraining policy's reasons); the W&B run's notes.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    warm_start: Path | None = Field(None, description="safetensors weights to start from (the champion's).")
    train_indices: Path | None = Field(
        None, description=".npy of the rows of train.beton to train on (an incremental retraining's new batches and "
        "replay sample); None: every row.",
    )
    fast_dev_run: bool = False
    audit_examples: bool = Field(
        False, description="Each rank writes a digest of every image of its first epoch to run_dir/audit/ (data-sharding checks)."
    )

    @model_validator(mode="after")
    def _distillation_needs_a_warm_start(self) -> "FitConfig":
        if self.optim.distillation and self.warm_start is None:
            raise ValueError("optim.distillation distils the warm start's predictions: it needs warm_start")
        return self


class SearchSpace(BaseModel):
    """What the `tune` job varies: ranges around the training defaults (rates on a log scale)."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: tuple[float, float] = Field((1e-3, 1e-2), description="Peak learning rate at reference_batch (log scale).")
    weight_decay: tuple[float, float] = Field((1e-5, 1e-2), description="Weight decay (log scale).")
    label_smoothing: tuple[float, float] = Field((0.0, 0.15), description="Label smoothing.")
    backbone_lr_ratio: tuple[float, float] = Field(
        (0.03, 1.0), description="The backbone's learning rate relative to the head's (log scale); searched only when "
        "training starts from pretrained weights.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> "SearchSpace":
        for name in type(self).model_fields:
            low, high = getattr(self, name)
            if not 0 <= low < high:
                raise ValueError(f"{name}: the range must be [low, high] with 0 <= low < high, got [{low}, {high}]")
        return self


class TuneConfig(BaseModel):
    """Everything `training.tune` needs: the training every trial varies, and the study's budget."""

    model_config = ConfigDict(extra="forbid")

    base: FitConfig = Field(description="The configured training; each trial changes only the searched fields.")
    study_name: str = Field(description="Same data and base training -> same study: a later tune adds trials to it.")
    storage: Path = Field(description="Optuna's journal file (append-only, safe to resume).")
    trials: int = Field(12, ge=1, description="Trials each tune run adds to the study.")
    timeout_minutes: float | None = Field(None, gt=0, description="Stop starting new trials after this long (None: no limit).")
    trial_epochs: int | None = Field(None, ge=1, description="Epochs of each trial (None: the training's own).")
    startup_trials: int = Field(
        4, ge=1, description="Trials sampled at random before the sampler (TPE) models the space and before pruning starts.",
    )
    warmup_epochs: int = Field(2, ge=0, description="Epochs a trial always runs before it can be pruned.")
    space: SearchSpace = Field(default_factory=SearchSpace)


class TunedHyperparameters(BaseModel):
    """The best trial of a study: what the next retraining takes (`trained_model`'s use_tuned)."""

    model_config = ConfigDict(extra="forbid")

    study: str
    trial: int
    val_loss: float = Field(description="The trial's validation cross-entropy: what the study minimises.")
    val_accuracy: float
    backbone: str
    pretrained: str | None
    values: dict[str, float] = Field(description="Training setting -> value (the names of OptimConfig and AugmentConfig).")

    def mismatch(self, model: ModelConfig) -> str | None:
        """Why these values do not fit a training of `model` (a different network or start), else None."""
        pretrained = str(model.pretrained) if model.pretrained else None
        if (self.backbone, self.pretrained) != (model.backbone, pretrained):
            return (f"tuned for backbone {self.backbone} from {self.pretrained or 'scratch'}, this training is "
                    f"{model.backbone} from {pretrained or 'scratch'}")
        return None

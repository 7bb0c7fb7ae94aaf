"""Augmentation recipes in FFCV's pipelines: what each transform does to the stored images, growing
crops between epochs, and test-time flip in the evaluated and exported graph."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder

from training.backbones import build_network
from training.config import AugmentConfig, ModelConfig
from training.data import make_loader
from training.export import export_fp32
from training.fit import ema_weight_averaging
from training.inference import onnx_session, predict_onnx
from training.model import ProgressiveResizing


def first_batch(path: Path, augment: AugmentConfig, decoder=None, size: int = 64) -> np.ndarray:
    loader = make_loader(path, size, 1, train=False, augment=augment, decoder=decoder)  # stored order
    images, _ = next(iter(loader))
    return images.numpy().copy()


def test_flips_mirror_images_and_cutout_blanks_one_square(digits_splits: dict):
    path, stored = digits_splits["dir"] / "train.beton", digits_splits["images"]["train"][:64]
    np.testing.assert_array_equal(first_batch(path, AugmentConfig()), stored)

    flipped = first_batch(path, AugmentConfig(horizontal_flip=True))
    mirrored = [np.array_equal(a, b[:, ::-1]) and not np.array_equal(a, b) for a, b in zip(flipped, stored)]
    kept = [np.array_equal(a, b) for a, b in zip(flipped, stored)]
    assert all(m or k for m, k in zip(mirrored, kept)) and 10 < sum(mirrored) < 54  # about half

    cut = first_batch(path, AugmentConfig(cutout=8))
    changed = cut != stored
    assert (cut[changed] == 0).all()  # blanked, nothing else touched
    assert all(changed[i].any(axis=2).sum() <= 64 for i in range(64)) and changed.any(axis=(1, 2, 3)).mean() > 0.5


def test_color_jitter_changes_brightness_and_contrast_and_keeps_grey_images_grey(digits_splits: dict):
    path, stored = digits_splits["dir"] / "train.beton", digits_splits["images"]["train"][:64]
    jittered = first_batch(path, AugmentConfig(color_jitter=0.4)).astype(int)
    changed = [not np.array_equal(a, b) for a, b in zip(jittered, stored)]
    assert 16 < sum(changed) < 64  # each of three transforms touches about half the images
    assert (jittered[..., 0] == jittered[..., 1]).all() and (jittered[..., 1] == jittered[..., 2]).all()
    means = jittered.mean(axis=(1, 2, 3)) / stored.astype(int).mean(axis=(1, 2, 3))
    assert means.min() < 0.95 or means.max() > 1.05  # brightness moved, by at most the magnitude and rounding
    assert (means > 0.5).all() and (means < 1.5).all()


def test_translation_shifts_the_content_within_the_padding(digits_splits: dict):
    path, stored = digits_splits["dir"] / "train.beton", digits_splits["images"]["train"][:64]
    shifted = first_batch(path, AugmentConfig(translate=2))
    for image, original in zip(shifted, stored):
        padded = np.pad(original, ((2, 2), (2, 2), (0, 0)))
        offsets = [(dy, dx) for dy in range(5) for dx in range(5) if np.array_equal(padded[dy : dy + 32, dx : dx + 32], image)]
        assert offsets, "an image is not a shift of its original by at most 2 pixels"
    assert not np.array_equal(shifted, stored)


def test_progressive_resizing_grows_the_crops_between_epochs(digits_splits: dict):
    schedule = ProgressiveResizing(start=16, end=32, epochs=8)
    sizes = [schedule.resolution(epoch) for epoch in range(8)]
    assert sizes[0] == 16 and sizes[-3:] == [32, 32, 32] and sizes == sorted(sizes)

    decoder = RandomResizedCropRGBImageDecoder((32, 32), scale=(0.5, 1.0))
    loader = make_loader(digits_splits["dir"] / "train.beton", 32, 1, train=True, augment=AugmentConfig(random_resized_crop=True), decoder=decoder)
    seen = []
    for size in (16, 24, 32):
        decoder.output_size = (size, size)  # what the callback does at an epoch's start
        images, _ = next(iter(loader))
        seen.append(tuple(images.shape))
    assert seen == [(32, 16, 16, 3), (32, 24, 24, 3), (32, 32, 32, 3)]


def test_test_time_flip_averages_an_image_and_its_mirror_in_the_exported_model_too(tmp_path: Path):
    torch.manual_seed(0)
    plain = build_network(ModelConfig(width=8, resolution=16, num_classes=5)).eval()
    flipping = build_network(ModelConfig(width=8, resolution=16, num_classes=5, test_time_flip=True)).eval()
    flipping.load_state_dict(plain.state_dict())
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    with torch.inference_mode():
        expected = (plain(images) + plain(images.flip(2))) / 2
        np.testing.assert_allclose(flipping(images).numpy(), expected.numpy(), atol=1e-6)
        assert not torch.allclose(plain(images), expected, atol=1e-4)
    exported = onnx_session(export_fp32(flipping, 16, tmp_path / "model.onnx"))
    np.testing.assert_allclose(predict_onnx(exported, images.numpy()), expected.numpy(), atol=1e-4)


def test_a_photos_recipe_with_weight_averaging_and_growing_crops_trains_end_to_end(
    digits_splits: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import training.fit
    from training.config import FitConfig, OptimConfig

    sizes = []

    class RecordSizes(ProgressiveResizing):  # the real callback, remembering what it set
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            super().on_train_epoch_start(trainer, pl_module)
            sizes.append(trainer.datamodule.crop_decoder.output_size)

    augment = AugmentConfig(
        random_resized_crop=True, crop_scale=(0.5, 1.0), horizontal_flip=True, label_smoothing=0.1, ema_decay=0.9, start_resolution=16,
    )
    config = FitConfig(
        # Integration, not accuracy: 32 steps of a heavy recipe on digits learn little.
        beton_dir=digits_splits["dir"], run_dir=tmp_path / "run", wandb_save_dir=tmp_path, augment=augment,
        model=ModelConfig(width=8), optim=OptimConfig(epochs=4, batch_size=50),
    )
    monkeypatch.setattr(training.fit, "ProgressiveResizing", RecordSizes)
    result = training.fit.fit(config)
    assert sizes == [(16, 16), (24, 24), (32, 32), (32, 32)]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    averaged, current = checkpoint["state_dict"], checkpoint["current_model_state"]  # EMA's layout
    assert not torch.equal(averaged["net.head.weight"], current["net.head.weight"])
    assert result.epochs_completed == 4


class _Regression(L.LightningModule):
    """y = 3x, learned from zero: what an average of its weights is worth is plain to read."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.weight * x, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_weight_averaging_warms_up_so_a_short_run_ships_trained_weights():
    """40 steps at decay 0.999: a fixed decay would keep ~96% of the zero start; the warmed-up one follows the training."""
    x = torch.linspace(-1, 1, 40).unsqueeze(1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, 3 * x), batch_size=1)
    model = _Regression()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ema_weight_averaging(0.999)],
    )
    trainer.fit(model, data)
    assert 2.0 < model.weight.item() < 3.5, model.weight.item()

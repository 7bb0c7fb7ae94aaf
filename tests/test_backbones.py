"""Standard backbones from torchvision and timm, started from the user's pretrained weights: the
published key names load, the head is the project's, and a frozen phase trains only the head."""

from pathlib import Path

import dagster as dg
import pytest
import torch
from safetensors.torch import load_file, save_file

from training.backbones import PretrainedWeightsError, build_network, load_pretrained
from training.config import FitConfig, ModelConfig, OptimConfig
from training.fit import fit, warm_start

RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"


def published_checkpoint(library: str, name: str, folder: Path) -> dict[str, Path]:
    """A checkpoint with the published key names and shapes of the library's model (random values,
    as no weights are downloaded here), saved as safetensors and as a `.pth` the way training
    scripts nest it."""
    if library == "torchvision":
        from torchvision.models import get_model

        state = get_model(name, weights=None).state_dict()
    else:
        import timm

        state = timm.create_model(name, pretrained=False).state_dict()
    state = {key: value.clone() for key, value in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / f"{name}.safetensors")
    torch.save({"state_dict": state, "epoch": 90}, folder / f"{name}.pth")
    return {"safetensors": folder / f"{name}.safetensors", "pth": folder / f"{name}.pth"}


@pytest.mark.parametrize(
    ("backbone", "library", "name", "classifier"),
    [("resnet18", "torchvision", "resnet18", ["fc.bias", "fc.weight"]),
     ("efficientnet_b0", "timm", "efficientnet_b0", ["classifier.bias", "classifier.weight"])],
)
@pytest.mark.parametrize("file_format", ["safetensors", "pth"])
def test_a_published_checkpoint_loads_and_the_head_is_replaced_for_the_projects_classes(
    tmp_path: Path, backbone: str, library: str, name: str, classifier: list[str], file_format: str
):
    path = published_checkpoint(library, name, tmp_path)[file_format]
    published = load_file(tmp_path / f"{name}.safetensors")
    network = build_network(ModelConfig(backbone=backbone, num_classes=7, resolution=32))

    assert load_pretrained(network, path, backbone) == classifier
    body = network.body.state_dict()
    assert set(body) == set(published) - set(classifier)
    assert all(torch.equal(body[key], published[key]) for key in body)
    assert network.head.out_features == 7 and network.head.in_features == published[classifier[1]].shape[1]
    logits = network.eval()(torch.zeros((2, 32, 32, 3), dtype=torch.uint8))
    assert logits.shape == (2, 7)


def test_weights_of_another_network_name_what_does_not_fit(tmp_path: Path):
    path = published_checkpoint("timm", "efficientnet_b0", tmp_path)["safetensors"]
    network = build_network(ModelConfig(backbone="resnet18", num_classes=7))
    with pytest.raises(PretrainedWeightsError, match=r"does not fit backbone resnet18: weights \d+ missing \(first: .*\d+ unexpected"):
        load_pretrained(network, path, "resnet18")


def test_missing_weights_say_what_to_fetch_and_where_to_put_it(tmp_path: Path):
    missing = tmp_path / "pretrained" / "resnet18.pth"
    with pytest.raises(PretrainedWeightsError) as raised:
        load_pretrained(build_network(ModelConfig(backbone="resnet18")), missing, "resnet18")
    assert str(raised.value) == f"pretrained weights for backbone resnet18 not found at {missing}: download {RESNET18_URL} and save it as {missing}"


def test_the_trained_model_asset_fails_with_that_line_before_launching_training(tmp_path: Path):
    from orchestration.assets.training import TrainingConfig, trained_model
    from orchestration.resources import FlywheelHome, TrainingCompute

    flywheel = FlywheelHome(home=str(tmp_path))
    with pytest.raises(dg.Failure) as raised:
        trained_model(
            context=dg.build_asset_context(),
            config=TrainingConfig(backbone="resnet18", pretrained="resnet18.pth"),
            flywheel=flywheel, compute=TrainingCompute(num_workers=1),
            ffcv_datasets={"classes": ["a", "b"], "resolution": 32},
        )
    expected = flywheel.pretrained / "resnet18.pth"
    assert raised.value.description == f"pretrained weights for backbone resnet18 not found at {expected}: download {RESNET18_URL} and save it as {expected}"
    assert not flywheel.checkpoints.exists()  # nothing was launched


def test_an_unknown_backbone_is_a_config_error_naming_the_choices():
    with pytest.raises(ValueError, match="unknown backbone 'resnet19': one of resnet_small, resnet18, .* or timm/<name> or torchvision/<name>"):
        ModelConfig(backbone="resnet19")


def test_a_warm_start_from_a_champion_with_fewer_classes_keeps_the_backbone():
    champion = build_network(ModelConfig(backbone="mobilenetv3_small", num_classes=2))
    grown = build_network(ModelConfig(backbone="mobilenetv3_small", num_classes=3))
    assert warm_start(grown, champion.state_dict()) == ["head.bias", "head.weight"]
    assert all(torch.equal(grown.body.state_dict()[key], value) for key, value in champion.body.state_dict().items())


def _last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {key.removeprefix("net."): value for key, value in state.items() if key.startswith("net.")}


def test_the_frozen_phase_trains_only_the_head_and_the_second_phase_the_rest(digits_splits: dict, tmp_path: Path):
    import lightning as L

    pretrained = published_checkpoint("torchvision", "resnet18", tmp_path / "pretrained")["safetensors"]
    published = load_file(pretrained)
    model = ModelConfig(backbone="resnet18", pretrained=pretrained)
    L.seed_everything(1, verbose=False)  # as fit does: the head's initial values
    initial_head = build_network(model).head.weight.detach().clone()

    def train(epochs: int, run: str) -> tuple[set[str], torch.Tensor]:
        """The published weights (buffers included) that training changed, and the head."""
        fit(FitConfig(
            beton_dir=digits_splits["dir"], run_dir=tmp_path / run, wandb_save_dir=tmp_path, model=model,
            optim=OptimConfig(epochs=epochs, freeze_epochs=1, backbone_lr_ratio=0.1, batch_size=64, seed=1),
        ))
        weights = _last_weights(tmp_path / run)
        body = {key.removeprefix("body."): value for key, value in weights.items() if key.startswith("body.")}
        assert set(body) == set(published) - {"fc.weight", "fc.bias"}
        return {key for key, value in body.items() if not torch.equal(value, published[key])}, weights["head.weight"]

    changed, head = train(1, "frozen")
    assert changed == set() and not torch.equal(head, initial_head)

    changed, fine_tuned_head = train(2, "both")
    assert {key for key in published if key.endswith(("conv1.weight", "conv2.weight", "running_mean"))} <= changed
    assert not torch.equal(fine_tuned_head, head)


def test_a_pretrained_file_replaced_at_the_same_path_starts_a_new_training_attempt(tmp_path: Path):
    import os

    from orchestration.assets.training import attempt_id

    datasets, payload = {"splits": {"train": {"fingerprint": "f"}}}, {"model": {"pretrained": "resnet18.pth"}}
    checkpoint = tmp_path / "resnet18.pth"
    checkpoint.write_bytes(b"first")
    first = attempt_id(datasets, payload, checkpoint)
    assert attempt_id(datasets, payload, checkpoint) == first
    checkpoint.write_bytes(b"second, longer")
    os.utime(checkpoint, ns=(1, 1))
    assert attempt_id(datasets, payload, checkpoint) != first
    assert attempt_id(datasets, payload, None) != first


def test_a_warm_start_needs_the_champions_network(tmp_path: Path):
    from orchestration.assets.training import TrainingConfig, champion_warm_start
    from tests.conftest import model_card
    from training.registry import ModelVersion

    (tmp_path / "card.json").write_text(model_card().model_dump_json())  # a resnet_small champion
    champion = ModelVersion("v0001", tmp_path)
    context = dg.build_asset_context()
    assert champion_warm_start(context, champion, TrainingConfig()) == str(tmp_path / "weights.safetensors")
    assert champion_warm_start(context, champion, TrainingConfig(backbone="resnet18")) is None
    assert champion_warm_start(context, None, TrainingConfig()) is None


def test_batchnorm_statistics_follow_a_short_training_unless_the_library_momentum_is_asked_for():
    def momenta(config: ModelConfig) -> set[float]:
        network = build_network(config)
        return {m.momentum for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}

    assert momenta(ModelConfig(backbone="mobilenetv3_small")) == {0.1}
    assert momenta(ModelConfig(backbone="mobilenetv3_small", batchnorm_momentum=None)) == {0.01}  # torchvision's

"""Runtime security checks on real files (test_security_static.py checks the source):

1. a malicious pickle where flywheel loads checkpoints and reference arrays runs nothing;
2. no name that reaches a path (batch id, partition key, version, champion pointer, simulate prefix,
   landing symlink) can leave the folder it belongs in;
3. the W&B API key never ends up in anything a model artifact upload writes."""

import pickle
import secrets
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestration.instance import get_instance
from flywheel.loop import failure_message
from orchestration.resources import FlywheelHome
from tests.conftest import model_card, write_servable_files
from tests.test_cli import run_cli
from training.registry import CHAMPION_FILE, ModelVersion, Registry, RegistryError
from transforms.landing import LandingFileError, check_batch_id, read_landing_file
from transforms.simulate import SimulationSpec, simulate_batches


class TouchOnLoad:
    """Unpickling this calls `Path(marker).touch()`: any code an unpickler runs would run the same way."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# --- 1. no pickle ------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch notes the plain pickle's protocol
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path: Path, writer: str):
    from training.fit import _last_checkpoint_step

    marker = tmp_path / "marker"
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    checkpoint = {"global_step": 7, "state_dict": TouchOnLoad(marker)}
    if writer == "torch.save":
        torch.save(checkpoint, last)
    else:
        with open(last, "wb") as handle:
            pickle.dump(checkpoint, handle)

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _last_checkpoint_step(last)
    assert not marker.exists()
    # Control: a full unpickler does run this very file, so "nothing ran" above is the loader's refusal.
    if writer == "torch.save":
        # torch.save writes a zip whose data.pkl is the pickle stream (no tensors here to resolve).
        with zipfile.ZipFile(last) as archive:
            pickle.loads(archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl"))))
    else:
        with open(last, "rb") as handle:
            pickle.load(handle)
    assert marker.exists()


def test_fit_refuses_to_resume_from_a_malicious_checkpoint(tmp_path: Path):
    from training.config import FitConfig
    from training.fit import fit

    marker = tmp_path / "marker"
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 7, "state_dict": TouchOnLoad(marker)}, run_dir / "checkpoints" / "last.ckpt")

    with pytest.raises(pickle.UnpicklingError):
        fit(FitConfig(beton_dir=tmp_path / "betons", run_dir=run_dir, wandb_save_dir=tmp_path))
    assert not marker.exists()
    assert not (tmp_path / "wandb").exists()  # refused before a W&B run started


def test_a_pickled_reference_array_is_refused_and_runs_nothing(home: Path, tmp_path: Path):
    from orchestration.assets.monitoring import _reference

    marker = tmp_path / "marker"
    champion = ModelVersion("v0001", home / "registry" / "v0001")
    folder = home / "monitoring" / "v0001"  # where monitoring keeps the champion's reference arrays
    folder.mkdir(parents=True)
    embeddings = folder / "reference_embeddings.npy"
    np.save(embeddings, np.array([TouchOnLoad(marker)], dtype=object), allow_pickle=True)
    np.save(folder / "reference_predictions.npy", np.zeros(3, dtype=np.int64))
    assert not marker.exists()

    with pytest.raises(ValueError, match="Object arrays cannot be loaded when allow_pickle=False"):
        _reference(FlywheelHome(home=str(home)), champion, {}, rows=10)
    assert not marker.exists()
    # Control: loading it with pickle allowed does run the payload.
    np.load(embeddings, allow_pickle=True)
    assert marker.exists()


# --- 2. path traversal -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "batch_id", ["../x", "..", "a/b", "/etc/passwd", "x\\y", "%2e%2e", "", "a" * 65, "ok\n", "."],
    ids=["dotdot slash", "dotdot", "slash", "absolute", "backslash", "url encoded", "empty", "65 chars", "newline", "dot"],
)
def test_a_batch_id_that_could_name_another_path_is_refused(batch_id: str):
    with pytest.raises(LandingFileError, match="is not allowed"):
        check_batch_id(batch_id)


def test_the_longest_allowed_batch_id_is_accepted():
    assert check_batch_id("a" * 64) == "a" * 64


def outside_listing(home: Path) -> dict[str, list[str]]:
    """What lies beside the data root and one level further up, where `../..` names lead."""
    return {str(folder): sorted(p.name for p in folder.iterdir()) for folder in (home.parent, home.parent.parent)}


def test_ingesting_a_traversal_partition_key_fails_and_writes_nothing_outside(home: Path):
    from orchestration.definitions import defs

    with get_instance(home) as instance:
        instance.add_dynamic_partitions("batches", ["../../escape"])
        before = outside_listing(home)

        result = defs.resolve_job_def("ingest").execute_in_process(
            instance=instance, partition_key="../../escape", raise_on_error=False
        )

    assert not result.success
    assert failure_message(result) == "batch id '../../escape' is not allowed: it must match [A-Za-z0-9_-]{1,64}"
    assert outside_listing(home) == before
    assert not (home / "warehouse.duckdb").exists()


def test_rollback_to_a_traversal_is_not_a_model_version(home: Path, capsys):
    assert run_cli("rollback", "--to", "../../etc") == 2
    assert "'../../etc' is not a model version" in capsys.readouterr().err
    assert not (home / "registry" / CHAMPION_FILE).exists()


def test_a_champion_pointer_holding_a_traversal_is_refused(home: Path):
    registry = Registry(home / "registry")
    registry.promote(registry.publish(write_servable_files(registry.staging_dir("a")), model_card()).version, "test")
    (registry.root / CHAMPION_FILE).write_text("../../../etc\n")

    with pytest.raises(RegistryError, match=r"names '\.\./\.\./\.\./etc', which is unusable: .* is not a model version"):
        registry.champion()


def test_simulate_with_a_traversal_prefix_writes_nothing(home: Path, capsys):
    before = outside_listing(home)
    assert run_cli("simulate", "--prefix", "../x") == 2
    assert "batch id '../x-000' is not allowed" in capsys.readouterr().err
    assert outside_listing(home) == before
    assert not list(home.rglob("*.parquet"))


@pytest.mark.parametrize("target", ["beside the data root", "/etc/passwd"])
def test_a_landing_symlink_to_a_file_outside_is_not_read(home: Path, target: str):
    landing = home / "landing"
    landing.mkdir()
    if target == "/etc/passwd":
        outside = Path(target)
    else:
        # A perfectly good landing file: only where it lives is wrong.
        (outside,), _ = simulate_batches(home.parent / "elsewhere", SimulationSpec(batches=1, batch_size=5))
    link = landing / "evil.parquet"
    link.symlink_to(outside)

    with pytest.raises(LandingFileError) as refused:
        read_landing_file(link)
    assert str(refused.value) == (
        f"{link}: links to {outside.resolve()}, outside the landing folder; refusing to read it"
    )


# --- 3. secrets in model artifacts -------------------------------------------------------------

def test_the_wandb_key_is_in_no_file_a_model_artifact_upload_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from training.tracking import log_model_artifact

    secret = secrets.token_hex(20)
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")
    # W&B also stages artifact files and logs outside the run folder: keep those where we can search them.
    for variable in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))
    registry = Registry(tmp_path / "registry")
    version = registry.publish(write_servable_files(registry.staging_dir("a")), model_card())
    save_dir = tmp_path / "save"

    run_id = log_model_artifact(version.path, version.version, version.card(), save_dir)

    run_files = list(save_dir.rglob(f"run-{run_id}.wandb"))
    assert run_files and b"flywheel-classifier" in run_files[0].read_bytes()  # the artifact was recorded
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
    assert leaks == []

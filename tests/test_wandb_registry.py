"""W&B as the model record: a promotion (the champion_model asset) and a rollback (the CLI) move the
`champion` alias of the model artifact, read back from the offline runs they wrote."""

from pathlib import Path

import dagster as dg
import pytest

from flywheel.cli import main
from orchestration.assets.deployment import champion_model
from orchestration.resources import FlywheelHome
from tests.conftest import model_card, write_servable_files
from training.registry import Registry
from training.tracking import find_offline_run, read_offline_run


def promote_through_the_asset(home: Path, version: str) -> str:
    """champion_model with every gate passed; the id of the W&B run that moved the alias."""
    passed = {"passed": True, "reasons": ["test"]}
    result = champion_model(
        context=dg.build_asset_context(), flywheel=FlywheelHome(home=str(home)),
        exported_model={"version": version, "export_gate": passed, "served_gate": passed}, model_evaluation={"gate": passed},
    )
    assert result.value["promoted"]
    return result.metadata["wandb_alias_run"].value


def model_artifact(home: Path, run_id: str) -> dict:
    (artifact,) = read_offline_run(find_offline_run(home / "wandb", run_id)).artifacts
    return artifact | {"aliases": set(artifact["aliases"]) - {"latest"}}  # W&B adds `latest` to every logged version


def test_promotion_and_rollback_move_the_wandb_champion_alias(home: Path, capsys):
    registry = Registry(home / "registry")
    for name, bias in (("first", 0.0), ("second", 1.0)):  # different files: different artifact versions
        staging = registry.staging_dir(name)
        write_servable_files(staging, logits_bias=bias)
        registry.publish(staging, model_card())

    first = model_artifact(home, promote_through_the_asset(home, "v0001"))
    second = model_artifact(home, promote_through_the_asset(home, "v0002"))
    assert first["name"] == second["name"] == "flywheel-classifier" and first["type"] == "model"
    assert first["aliases"] == {"v0001", "champion"} and second["aliases"] == {"v0002", "champion"}
    assert first["digest"] != second["digest"]

    with pytest.raises(SystemExit) as exit_info:
        main(["rollback"])
        raise SystemExit(0)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "champion: v0002 -> v0001" in out
    rollback_run = out.split("(run ")[1].split(";")[0]
    restored = model_artifact(home, rollback_run)
    # The same files as v0001's: W&B keeps one artifact version for one digest, so the alias moves back to it.
    assert restored["aliases"] == {"v0001", "champion"} and restored["digest"] == first["digest"]
    assert registry.champion().version == "v0001"

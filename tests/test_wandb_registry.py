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
    """champion_model with every gate passed; the id of the W&B run that moved the alias, if one did."""
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
    assert promote_through_the_asset(home, "v0002") == "none (nothing moved)"  # a re-run logs nothing

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


def test_an_evaluation_is_logged_as_wandb_tables_with_the_worst_misclassified_images(tmp_path: Path):
    import json

    import numpy as np

    from training.evaluate import Evaluation, classification_metrics
    from training.tracking import log_evaluation

    labels = np.array([0, 1, 2, 0, 1, 2])
    logits = np.array([[5, 0, 0], [0, 5, 0], [0, 0.2, 0], [0, 9, 0], [1, 0, 0], [0, 0, 5]], dtype=np.float32)
    metrics = classification_metrics(logits, labels, 3)
    evaluation = Evaluation(metrics, None, None, logits)
    rows, confidence = evaluation.worst_misclassified(labels, 16)
    assert rows.tolist() == [3, 4, 2]  # wrong, the most confident first (9 > 1 > 0.2 on the wrong class)
    assert confidence[0] > confidence[1] > confidence[2]

    worst = [{"image": np.full((8, 8, 3), 50 * r, np.uint8), "label": int(labels[r]), "predicted": int(logits[r].argmax()), "confidence": float(c), "batch": "b"}
             for r, c in zip(rows, confidence)]
    run_id = log_evaluation("evaluate-test", metrics.to_dict(), ["cat", "dog", "fox"], worst, tmp_path)
    path = find_offline_run(tmp_path / "wandb", run_id)
    (logged,) = read_offline_run(path).history  # nested keys flattened: "<table>/_type", "<table>/path"
    tables = {key.removesuffix("/_type"): json.loads((path.parent / "files" / logged[key.replace("/_type", "/path")]).read_text())
              for key, value in logged.items() if key.endswith("/_type") and value == "table-file"}
    assert set(tables) == {"evaluation/per_class", "evaluation/confusion_matrix", "evaluation/worst_misclassified"}
    assert [row[1] for row in tables["evaluation/per_class"]["data"]] == ["cat", "dog", "fox"]
    assert ["cat", "dog", 1] in tables["evaluation/confusion_matrix"]["data"]
    misclassified = tables["evaluation/worst_misclassified"]
    assert [row[1:3] for row in misclassified["data"]] == [["cat", "dog"], ["dog", "cat"], ["fox", "dog"]]
    # The images travel in the table's artifact (W&B dedupes them by content; these three differ).
    (table_artifact,) = [a for a in read_offline_run(path).artifacts if "worst_misclassified" in a["name"]]
    assert len([f for f in table_artifact["files"] if f.startswith("media/images/") and f.endswith(".png")]) == 3

"""Deployment: export to ONNX (fp32 and int8) into an immutable registry version, then promote it
to champion only when the evaluation gate and the export gate both passed."""

import shutil
from dataclasses import asdict
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from orchestration.metadata import accuracy_text, code_version, inputs_fingerprint, markdown_table, readable
from orchestration.resources import FlywheelHome
from training.card import GateVerdict, Lineage, build_card
from training.config import AugmentConfig, ModelConfig, OptimConfig
from training.gate import GateDecision, GatePolicy
from training.registry import WEIGHTS_FILE, ModelVersion, Registry
from training.results import ExportGatePolicy, Metrics


class ExportConfig(dg.Config):
    max_accuracy_drop: float = Field(
        0.01, ge=0, le=1, description="int8 may lose at most this much top-1 accuracy vs fp32 on the same test images; "
        "it is refused when it loses significantly more (at `level`), so one flipped image of a small test set is not a failure.",
    )
    level: float = Field(0.05, gt=0, lt=0.5, description="One-sided significance level of the int8 accuracy drop.")
    max_size_ratio: float = Field(0.3, gt=0, description="int8 file at most this fraction of the fp32 file.")
    max_parity_diff: float = Field(1e-3, gt=0, description="Largest allowed |torch - ONNX fp32| logit difference.")
    calibration_images: int = Field(
        512, ge=16, description="int8 calibration sample: at most this many validation images, balanced over the classes "
        "(fewer at high resolutions: training.export.CALIBRATION_PIXELS bounds its time).",
    )
    temperature_images: int = Field(
        5000, ge=100, description="The served model's temperature (accuracy estimates before labels) is fitted on at most "
        "this many validation images, a uniform random sample (streamed: only their logits are kept).",
    )

    def policy(self) -> ExportGatePolicy:
        return ExportGatePolicy(self.max_accuracy_drop, self.max_size_ratio, self.max_parity_diff, self.level)


@dg.asset(
    description="The candidate as ONNX fp32 and int8 (uint8 NHWC `image` in, `logits` out) plus safetensors "
    "weights and a model card, published as a new immutable registry version.",
    group_name="deployment",
    kinds={"onnx"},
)
def exported_model(
    context: dg.AssetExecutionContext,
    config: ExportConfig,
    flywheel: FlywheelHome,
    ffcv_datasets: dict,
    trained_model: dict,
    model_evaluation: dict,
) -> dg.Output[dict]:
    from training.tracking import log_model_artifact  # heavy: imported by the runs that use it (orchestration/__init__.py)

    registry = Registry(flywheel.registry)
    # Same training attempt and same export settings -> the same files: the version published from
    # them is the answer, so a re-run (or a retry after a crash) publishes nothing new.
    fingerprint = inputs_fingerprint([trained_model["attempt"], config.model_dump()])
    version = registry.find(fingerprint)
    artifact_run = None
    if version is not None:
        context.log.info(f"{version.version} was exported from these same inputs already; publishing nothing new")
    else:
        version = _export_and_publish(
            context, config, registry, flywheel.int8_recipes, fingerprint, ffcv_datasets, trained_model, model_evaluation,
        )
        artifact_run = log_model_artifact(version.path, version.version, version.card(), flywheel.root)
    card = version.card()
    export, gate, served = card.export, card.gates.export, card.gates.served
    for reason in gate.reasons:
        context.log.info(f"export gate: {reason}")
    for reason in served.reasons:
        context.log.info(f"served model gate: {reason}")
    trials = pl.DataFrame([
        {**{key: value for key, value in asdict(trial).items() if key != "drop"},
         "drop_lower_bound": trial.drop.lower_bound if trial.drop else None}
        for trial in export.int8_recipe_trials
    ]).sort("latency_ms_batch64")
    return dg.Output(
        {"version": version.version, "path": str(version.path), "export_gate": gate.model_dump(), "served_gate": served.model_dump()},
        metadata=readable({
            "version": version.version,
            "newly_published": artifact_run is not None,
            "registry_path": dg.MetadataValue.path(str(version.path)),
            "fp32_bytes": export.fp32_bytes,
            "int8_bytes": export.int8_bytes,
            "int8_size_ratio": round(export.int8_bytes / export.fp32_bytes, 4),
            "fp32_test_accuracy": accuracy_text(card.metrics.test_accuracy_onnx_fp32, card.metrics.test_examples),
            "int8_test_accuracy": accuracy_text(card.metrics.test_accuracy_int8, card.metrics.test_examples),
            "parity_max_abs_diff": export.parity_max_abs_diff,
            "int8_temperature": card.calibration.temperature if card.calibration else "none",
            "int8_validation_ece": (f"{card.calibration.ece_before:.4f} -> {card.calibration.ece_after:.4f} after temperature scaling"
                                    if card.calibration else "none"),
            "int8_recipe": export.int8_recipe,
            "int8_recipe_source": "searched over every recipe" if export.int8_recipe_searched else "remembered for this architecture and machine",
            "int8_recipe_trials": markdown_table(trials),
            "wandb_artifact_run": artifact_run or "none (already logged when published)",
            "export_gate_passed": gate.passed,
            "export_gate": dg.MetadataValue.md("\n".join(f"- {r}" for r in gate.reasons)),
            "served_gate_passed": served.passed,
            "served_gate": dg.MetadataValue.md("\n".join(f"- {r}" for r in served.reasons)),
        }),
    )


def _export_and_publish(
    context: dg.AssetExecutionContext, config: ExportConfig, registry: Registry, int8_recipes: Path,
    fingerprint: str, ffcv_datasets: dict, trained_model: dict, model_evaluation: dict,
) -> ModelVersion:
    from training.calibration import calibrate
    from training.data import beton_batches, read_beton
    from training.evaluate import TestSet, evaluate_models
    from training.export import RecipeMemory, calibration_indices, calibration_size, export_candidate, export_gate
    from training.inference import load_classifier, onnx_session, predict_onnx

    model_config = ModelConfig.model_validate(trained_model["model"])
    network = load_classifier(Path(trained_model["weights_path"]), model_config)
    validation = ffcv_datasets["splits"]["val"]
    validation_labels = pl.read_parquet(validation["index"], columns=["label"])["label"].to_numpy()
    calibration_images, _ = read_beton(
        Path(validation["path"]),
        indices=calibration_indices(validation_labels, calibration_size(config.calibration_images, model_config.resolution)),
    )
    test_split = ffcv_datasets["splits"]["test"]
    test = TestSet.load(Path(test_split["path"]), Path(test_split["index"]))

    staging = registry.staging_dir(context.run_id)
    report = export_candidate(
        network, model_config.resolution, calibration_images, test, staging, config.policy(), RecipeMemory(int8_recipes),
    )
    passed, reasons = export_gate(report, config.policy())
    # The model users get is the int8 file: it faces the champion's int8 file by the evaluation gate's rules.
    champion = registry.champion()
    served_session = onnx_session(Path(report.int8_path))
    champion_session = champion.inference_session() if champion else None
    served = evaluate_models(
        test, lambda images: predict_onnx(served_session, images),
        (lambda images: predict_onnx(champion_session, images)) if champion_session else None,
        model_config.num_classes, GatePolicy.model_validate(model_evaluation["gate_policy"]), "int8",
    )
    # Uniform, not class-balanced: the estimate's confidences must match accuracy as classes come.
    sample = np.sort(np.random.default_rng(0).permutation(len(validation_labels))[:config.temperature_images])
    calibration = calibrate(lambda images: predict_onnx(served_session, images), beton_batches(Path(validation["path"]), indices=sample))
    context.log.info(
        f"served model's temperature {calibration.temperature:.3f} on {calibration.validation_images} validation images: "
        f"ECE {calibration.ece_before:.4f} -> {calibration.ece_after:.4f}"
    )
    shutil.copyfile(trained_model["weights_path"], staging / WEIGHTS_FILE)
    card = build_card(
        model_config, ffcv_datasets["classes"], ffcv_datasets["resize"], ffcv_datasets["mode"],
        Metrics(**model_evaluation["candidate"]), trained_model["val_accuracy"], report, config.policy(),
        evaluation_gate=GateDecision.model_validate(model_evaluation["gate"]),
        export_gate=GateVerdict(passed=passed, reasons=reasons),
        served_ece=served.candidate.ece,
        served_gate=served.gate,
        calibration=calibration,
        augment=AugmentConfig.model_validate(trained_model["augment"]),
        optim=OptimConfig.model_validate(trained_model["optim"]) if "optim" in trained_model else None,
        lineage=Lineage(
            training_batches=trained_model["training_batches"],
            training_attempt=trained_model["attempt"],
            parent_champion=trained_model["parent_champion"],
            tuned_from=trained_model.get("tuned_from"),
            training_mode=trained_model.get("mode", "full"),
            compared_with_champion=model_evaluation["champion_version"],
            code_version=code_version(),
            wandb_run_id=trained_model["wandb_run_id"],
            dagster_run_id=context.run_id,
            inputs_fingerprint=fingerprint,
        ),
    )
    return registry.publish(staging, card)


@dg.asset(
    description="The registry's champion pointer: flipped atomically to the new version only when the "
    "evaluation gate, the export gate and the served-model gate all passed.",
    group_name="deployment",
    kinds={"onnx"},
)
def champion_model(
    context: dg.AssetExecutionContext, flywheel: FlywheelHome, exported_model: dict, model_evaluation: dict
) -> dg.Output[dict]:
    registry = Registry(flywheel.registry)
    gates = {
        "evaluation": model_evaluation["gate"]["passed"],
        "export": exported_model["export_gate"]["passed"],
        "served model": exported_model["served_gate"]["passed"],
    }
    candidate = exported_model["version"]
    promoted = all(gates.values())
    wandb_run = None
    if promoted:
        from training.tracking import log_champion  # heavy: imported by the runs that use it

        before = registry.champion_pointer()
        version = registry.promote(candidate, reason="; ".join(model_evaluation["gate"]["reasons"]))
        if before != candidate:  # a re-run that promotes the champion again moves nothing
            wandb_run = log_champion(version.path, version.version, version.card(), flywheel.root, event="promote")
        context.log.info(f"{candidate} is the champion (W&B alias `champion`: {f'moved by run {wandb_run}' if wandb_run else 'already there'})")
    else:
        failed = [name for name, ok in gates.items() if not ok]
        context.log.warning(f"{candidate} was not promoted: the {' and '.join(failed)} gate failed")
    champion = registry.champion()
    metrics = champion.card().metrics if champion else None
    return dg.Output(
        {"champion": champion.version if champion else None, "candidate": candidate, "promoted": promoted},
        metadata={
            "champion": champion.version if champion else "none",
            "candidate": candidate,
            "promoted": promoted,
            "champion_test_accuracy": accuracy_text(metrics.test_accuracy, metrics.test_examples) if metrics else "none",
            "champion_int8_test_accuracy": accuracy_text(metrics.test_accuracy_int8, metrics.test_examples) if metrics else "none",
            "champion_path": dg.MetadataValue.path(str(champion.path)) if champion else "none",
            "wandb_alias_run": wandb_run or "none (nothing moved)",
        },
    )

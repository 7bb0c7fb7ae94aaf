"""`$FLYWHEEL_HOME/flywheel.yaml` (or `flywheel run --config FILE`): the project (`orchestration.project`:
classes, resolution) and, per asset, the same typed config the Dagster UI's launchpad takes, e.g.

    classes: [cat, dog, fox]
    trained_model:
      epochs: 12
    model_evaluation:
      non_inferiority_margin: 0.01

Validated as a whole before anything runs, so a bad value is a one-line message, not a failed run."""

from pathlib import Path

import dagster as dg
import pydantic

from orchestration.assets.deployment import ExportConfig
from orchestration.assets.evaluation import GateConfig
from orchestration.assets.ingestion import IngestConfig
from orchestration.assets.labeling import LabelingConfig
from orchestration.assets.monitoring import DriftConfig
from orchestration.assets.training import TrainingConfig, TuneJobConfig
from orchestration.project import PROJECT_KEYS, SettingsError, load_project, read_yaml, validation_message
from orchestration.resources import FlywheelHome

# Op name (the asset, or the multi-asset that writes it) -> its config class.
CONFIG_CLASSES: dict[str, type[dg.Config]] = {
    "ingest_batch": IngestConfig,
    "trained_model": TrainingConfig,
    "tuned_hyperparameters": TuneJobConfig,
    "model_evaluation": GateConfig,
    "exported_model": ExportConfig,
    "drift_report": DriftConfig,
    "labeling_queue": LabelingConfig,
}


def load_settings(path: Path) -> dict[str, dict]:
    """The per-asset run settings of the file; its project keys are checked too (`load_project`)."""
    raw = read_yaml(path)
    load_project(path)
    settings = {}
    for name, values in raw.items():
        if name in PROJECT_KEYS:
            continue
        if name not in CONFIG_CLASSES:
            raise SettingsError(
                f"{path}: {name!r} is not a setting; the project has {', '.join(PROJECT_KEYS)}, and these assets "
                f"take settings: {', '.join(CONFIG_CLASSES)}"
            )
        if not isinstance(values, dict):
            raise SettingsError(f"{path}: {name} must be a mapping of setting -> value")
        known = CONFIG_CLASSES[name].model_fields
        unknown = [key for key in values if key not in known]
        if unknown:
            raise SettingsError(f"{path}: {name} has no setting {', '.join(map(repr, unknown))}; it has {', '.join(known)}")
        try:
            settings[name] = CONFIG_CLASSES[name].model_validate(values).model_dump()
        except pydantic.ValidationError as error:
            raise SettingsError(validation_message(path, error, prefix=f"{name}.")) from None
    return settings


def current_settings(flywheel: FlywheelHome) -> dict[str, dict]:
    """The run settings of the project file, or none when there is no file."""
    return load_settings(flywheel.settings) if flywheel.settings.exists() else {}


def run_settings(flywheel: FlywheelHome, job_name: str) -> dict:
    """The run config of the settings file (if any) for the ops of this job: what sensors request."""
    from orchestration.definitions import defs  # here: the definitions import the sensors, which import this

    return run_config(defs.resolve_job_def(job_name), current_settings(flywheel), {})


def run_config(job: dg.JobDefinition, settings: dict[str, dict], base: dict) -> dict:
    """`base` run config plus the settings of the ops this job runs (Dagster refuses config for others)."""
    ops = {name: {"config": values} for name, values in settings.items() if job.graph.has_node_named(name)}
    return {**base, "ops": ops} if ops else base

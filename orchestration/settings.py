"""`$FLYWHEEL_HOME/flywheel.yaml` (or `flywheel run --config FILE`): the project (`orchestration.project`:
classes, resolution), per asset the same typed config the Dagster UI's launchpad takes, and the
`compute` resource's (where training runs), e.g.

    classes: [cat, dog, fox]
    trained_model:
      epochs: 12
    model_evaluation:
      non_inferiority_margin: 0.01
    compute:
      launcher: ray
      ray_address: "10.0.0.5:6379"

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
from orchestration.resources import FlywheelHome, TrainingCompute
from training.config import ComputeConfig

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
# Resource -> its class: the runs of every job that uses it get these settings as its config.
RESOURCE_CLASSES: dict[str, type[dg.ConfigurableResource]] = {"compute": TrainingCompute}


def compute_settings(path: Path, values: dict) -> dict:
    """The `compute` section, checked as the resource and as the training's ComputeConfig (a launcher's
    required settings) without starting anything."""
    try:
        compute = TrainingCompute.model_validate(values)
        if compute.launcher != "torchrun":  # torchrun's placement may count this machine's GPUs: torch
            ComputeConfig.model_validate(compute.compute_config())
    except pydantic.ValidationError as error:
        raise SettingsError(validation_message(path, error, prefix="compute.")) from None
    return values


def load_settings(path: Path) -> dict[str, dict]:
    """The per-asset run settings of the file; its project keys are checked too (`load_project`)."""
    raw = read_yaml(path)
    load_project(path)
    settings = {}
    for name, values in raw.items():
        if name in PROJECT_KEYS:
            continue
        if name not in CONFIG_CLASSES and name not in RESOURCE_CLASSES:
            raise SettingsError(
                f"{path}: {name!r} is not a setting; the project has {', '.join(PROJECT_KEYS)}, these assets "
                f"take settings: {', '.join(CONFIG_CLASSES)}, and these resources: {', '.join(RESOURCE_CLASSES)}"
            )
        if not isinstance(values, dict):
            raise SettingsError(f"{path}: {name} must be a mapping of setting -> value")
        if name == "compute":
            settings[name] = compute_settings(path, values)
            continue
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
    """`base` run config plus the settings of the ops this job runs and of the resources it uses
    (Dagster refuses config for others)."""
    ops = {name: {"config": values} for name, values in settings.items() if name in CONFIG_CLASSES and job.graph.has_node_named(name)}
    resources = {
        name: {"config": values} for name, values in settings.items() if name in RESOURCE_CLASSES and name in job.required_resource_keys
    }
    return {**base, **({"ops": ops} if ops else {}), **({"resources": resources} if resources else {})}

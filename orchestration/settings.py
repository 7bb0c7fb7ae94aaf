"""Settings for `flywheel run --config FILE`: per asset, the same typed config the Dagster UI's
launchpad takes, e.g.

    trained_model:
      epochs: 12
    model_evaluation:
      non_inferiority_margin: 0.01

Validated as a whole before anything runs, so a bad value is a one-line message, not a failed run."""

from pathlib import Path

import dagster as dg
import pydantic
import yaml

from orchestration.assets.deployment import ExportConfig
from orchestration.assets.evaluation import GateConfig
from orchestration.assets.ingestion import IngestConfig
from orchestration.assets.monitoring import DriftConfig
from orchestration.assets.training import TrainingConfig
from orchestration.resources import FlywheelHome

# Op name (the asset, or the multi-asset that writes it) -> its config class.
CONFIG_CLASSES: dict[str, type[dg.Config]] = {
    "ingest_batch": IngestConfig,
    "trained_model": TrainingConfig,
    "model_evaluation": GateConfig,
    "exported_model": ExportConfig,
    "drift_report": DriftConfig,
}


class SettingsError(Exception):
    """A settings file that cannot be used; the message names the file, the entry and the reason."""


def load_settings(path: Path) -> dict[str, dict]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SettingsError(f"{path}: not a readable YAML file ({error})") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: expected a mapping of asset name -> settings, got {type(raw).__name__}")
    settings = {}
    for name, values in raw.items():
        if name not in CONFIG_CLASSES:
            raise SettingsError(f"{path}: {name!r} takes no settings; these do: {', '.join(CONFIG_CLASSES)}")
        if not isinstance(values, dict):
            raise SettingsError(f"{path}: {name} must be a mapping of setting -> value")
        known = CONFIG_CLASSES[name].model_fields
        unknown = [key for key in values if key not in known]
        if unknown:
            raise SettingsError(f"{path}: {name} has no setting {', '.join(map(repr, unknown))}; it has {', '.join(known)}")
        try:
            settings[name] = CONFIG_CLASSES[name].model_validate(values).model_dump()
        except pydantic.ValidationError as error:
            problems = "; ".join(f"{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise SettingsError(f"{path}: {problems}") from None
    return settings


def run_settings(flywheel: FlywheelHome, job_name: str) -> dict:
    """The run config of the settings file (if any) for the ops of this job: what sensors request."""
    from orchestration.definitions import defs  # here: the definitions import the sensors, which import this

    return run_config(defs.resolve_job_def(job_name), load_settings(flywheel.settings) if flywheel.settings.exists() else {}, {})


def run_config(job: dg.JobDefinition, settings: dict[str, dict], base: dict) -> dict:
    """`base` run config plus the settings of the ops this job runs (Dagster refuses config for others)."""
    ops = {name: {"config": values} for name, values in settings.items() if job.graph.has_node_named(name)}
    return {**base, "ops": ops} if ops else base

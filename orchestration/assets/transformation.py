"""Transformation: the dbt project (staging -> intermediate -> marts) as Dagster assets; dbt tests
become asset checks."""

import importlib.metadata
import os
from collections.abc import Mapping, Sequence
from functools import cache, cached_property
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, DbtProject, dbt_assets
from packaging import version

from orchestration.resources import REPO_ROOT, FlywheelHome, environment_executable
from transforms import warehouse


@cache
def dbt_project() -> DbtProject:
    """The manifest is prepared at build time (`make setup` runs `dbt parse` when a model changes),
    not on import, and not by `prepare_if_dev()`, which would look for dbt on PATH."""
    return DbtProject(project_dir=REPO_ROOT / "dbt_project", profiles_dir=REPO_ROOT / "dbt_project")


class FlywheelDbtCli(DbtCliResource):
    """dagster-dbt's resource without two fixed costs it pays on every build, ~6 s of a tick's dbt step.
    It asks the dbt executable for its version in a subprocess: the executable is this environment's,
    so the installed dbt-core says the same. And it builds a dbt adapter in this process, parsing
    dbt's ~500 macros, for row counts and column metadata: flywheel fetches neither (the warehouse's
    one writer is the dbt process while it runs)."""

    @cached_property
    def _cli_version(self) -> version.Version:
        return version.parse(importlib.metadata.version("dbt-core"))

    def _initialize_dbt_core_adapter(self, args: Sequence[str]) -> None:
        return None


def dbt_resource() -> DbtCliResource:
    # The environment's own dbt, so a venv works without being activated.
    return FlywheelDbtCli(project_dir=dbt_project(), dbt_executable=environment_executable("dbt"))


class FlywheelDbtTranslator(DagsterDbtTranslator):
    """dbt sources are the ingestion assets (`raw_images`), models keep their names, all in one group."""

    def get_asset_key(self, dbt_resource_props: Mapping[str, Any]) -> dg.AssetKey:
        # By name alone: the source `flywheel.raw_images` is the asset ingestion materializes.
        return dg.AssetKey(dbt_resource_props["name"])

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str:
        return "transformation"

    def get_automation_condition(self, dbt_resource_props: Mapping[str, Any]) -> dg.AutomationCondition:
        # Under the daemon, models rebuild as soon as ingestion lands new rows or labels.
        return dg.AutomationCondition.eager()


@dbt_assets(
    manifest=dbt_project().manifest_path,
    project=dbt_project(),
    dagster_dbt_translator=FlywheelDbtTranslator(),
    pool="warehouse",
)
def dbt_models(context: dg.AssetExecutionContext, dbt: DbtCliResource, flywheel: FlywheelHome):
    # The profile reads the data root from the environment; set it to this run's resource value.
    os.environ["FLYWHEEL_HOME"] = str(flywheel.root)
    warehouse.prepare(flywheel.warehouse)
    # cautious: when automation builds a subset of the models, a test that spans a model outside it
    # (a relationships test) waits for a run that builds both, instead of failing on a missing table.
    # One target folder per data root instead of dagster-dbt's folder per run inside the repository
    # (2.5 MB a build, never removed), the only writer being this step (the `warehouse` pool).
    yield from dbt.cli(
        ["build", "--indirect-selection", "cautious"], context=context, target_path=flywheel.dbt_target,
    ).stream()

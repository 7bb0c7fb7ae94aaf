"""Asset values between stages are small JSON documents (paths, versions, metrics), never pickles:
nothing under the data root is ever loaded with pickle."""

import json
import os
from pathlib import Path

import dagster as dg

from orchestration.resources import FlywheelHome
from transforms.landing import check_batch_id


def value_path(flywheel: FlywheelHome, key: dg.AssetKey, partition: str | None) -> Path:
    name = check_batch_id(partition) if partition else "__unpartitioned__"
    return flywheel.root.joinpath("values", *key.path) / f"{name}.json"


def stored_values(flywheel: FlywheelHome, asset: str) -> list[dict]:
    """Every stored value of one asset (all partitions), ordered by partition key."""
    folder = value_path(flywheel, dg.AssetKey(asset), None).parent
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []


class JsonIOManager(dg.ConfigurableIOManager):
    """Stores each asset value as `$FLYWHEEL_HOME/values/<asset key>/<partition>.json`."""

    flywheel: dg.ResourceDependency[FlywheelHome]

    def _path(self, key: dg.AssetKey, partition: str | None) -> Path:
        return value_path(self.flywheel, key, partition)

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        if obj is None:  # assets that only materialize tables (dbt) pass no value on
            return
        partition = context.partition_key if context.has_asset_partitions else None
        path = self._path(context.asset_key, partition)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(partial, path)

    def load_input(self, context: dg.InputContext):
        partition = context.asset_partition_key if context.has_asset_partitions else None
        path = self._path(context.asset_key, partition)
        if not path.exists():
            raise FileNotFoundError(
                f"no stored value for asset {context.asset_key.to_user_string()} at {path}: materialize it first"
            )
        return json.loads(path.read_text())

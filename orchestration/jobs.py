"""Jobs launchable from the UI, the CLI, sensors and schedules. Each is one step of the loop."""

import dagster as dg

from orchestration.assets.transformation import dbt_models
from orchestration.partitions import batch_partitions

ingest_job = dg.define_asset_job(
    "ingest",
    selection=dg.AssetSelection.assets("raw_images", "quarantined_images"),
    partitions_def=batch_partitions,
    description="Validate one landed batch and load it into the warehouse (bad rows to quarantine).",
)

labels_job = dg.define_asset_job(
    "load_labels",
    selection=dg.AssetSelection.assets("raw_labels"),
    description="Load late label files (landing/labels/*.parquet) into the warehouse.",
)

transform_job = dg.define_asset_job(
    "transform",
    selection=dg.AssetSelection.assets(dbt_models),
    description="dbt build: staging -> intermediate -> marts, with dbt tests as asset checks.",
)

retrain_job = dg.define_asset_job(
    "retrain",
    selection=dg.AssetSelection.assets(
        "ffcv_datasets", "trained_model", "model_evaluation", "exported_model", "champion_model"
    ),
    description="Write FFCV datasets, train a candidate, evaluate it against the champion, export and "
    "promote it if every gate passes.",
)

tune_job = dg.define_asset_job(
    "tune",
    selection=dg.AssetSelection.assets("ffcv_datasets", "tuned_hyperparameters"),
    description="Optuna search over the training's hyperparameters on the current datasets (optional); the next "
    "retraining takes the best trial's values, and the gates still decide what ships.",
)

monitor_job = dg.define_asset_job(
    "monitor",
    selection=dg.AssetSelection.assets("drift_report", "labeling_queue"),
    partitions_def=batch_partitions,
    description="Drift report of one batch against the champion's training data, and its labeling queue.",
)

full_loop_job = dg.define_asset_job(
    "full_loop",
    selection=dg.AssetSelection.assets(
        "raw_labels", dbt_models, "ffcv_datasets", "trained_model", "model_evaluation", "exported_model", "champion_model"
    ),
    description="Everything after ingestion in one run: late labels, dbt, datasets, training, evaluation, "
    "export and promotion (batches are ingested and monitored per partition by the sensors).",
)

freshness_job = dg.define_asset_job(
    "check_freshness",
    selection=dg.AssetSelection.checks_for_assets("champion_model"),
    description="The champion's freshness checks: not stale while newer labeled data waits, no labeled batch left unused too long.",
)

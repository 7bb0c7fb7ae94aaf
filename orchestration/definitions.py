"""The Dagster code location: assembles assets, jobs and resources; decides nothing itself."""

import dagster as dg

from orchestration.assets.datasets import ffcv_datasets
from orchestration.assets.deployment import champion_model, exported_model
from orchestration.assets.evaluation import model_evaluation
from orchestration.assets.ingestion import ingest_batch, raw_labels
from orchestration.assets.labeling import labeling_queue
from orchestration.assets.monitoring import drift_report
from orchestration.assets.training import trained_model, tuned_hyperparameters
from orchestration.assets.transformation import dbt_models, dbt_resource
from orchestration.automation import (
    drift_sensor,
    freshness_schedule,
    monitoring_sensor,
    retraining_schedule,
    run_failure_recorder,
    transform_on_ingestion,
)
from orchestration.checks import evaluation_gate, export_gate, freshness_checks, served_model_gate
from orchestration.io_manager import JsonIOManager
from orchestration.jobs import freshness_job, full_loop_job, ingest_job, labels_job, monitor_job, retrain_job, transform_job, tune_job
from orchestration.resources import FlywheelHome, TrainingCompute
from orchestration.sensors import landing_sensor

flywheel = FlywheelHome()

defs = dg.Definitions(
    assets=[
        ingest_batch,
        raw_labels,
        dbt_models,
        ffcv_datasets,
        trained_model,
        tuned_hyperparameters,
        model_evaluation,
        exported_model,
        champion_model,
        drift_report,
        labeling_queue,
    ],
    asset_checks=[evaluation_gate, export_gate, served_model_gate, freshness_checks],
    jobs=[ingest_job, labels_job, transform_job, retrain_job, tune_job, monitor_job, full_loop_job, freshness_job],
    sensors=[landing_sensor, transform_on_ingestion, monitoring_sensor, drift_sensor, run_failure_recorder],
    schedules=[retraining_schedule, freshness_schedule],
    # Every job is a chain of steps, so a process per step (Dagster's default) runs nothing in
    # parallel and costs a code load per step: importing torch, Lightning and FFCV (which compiles
    # with numba on import) takes seconds. Training and dbt still run as their own processes.
    executor=dg.in_process_executor,
    resources={
        "flywheel": flywheel,
        "compute": TrainingCompute(),
        "dbt": dbt_resource(),
        "io_manager": JsonIOManager(flywheel=flywheel),
    },
)

"""Dagster for flywheel: assets, resources, jobs, schedules, sensors and checks. Thin by design: an
asset gathers its inputs, calls one library function from `transforms` or `training`, and records
metadata.

Every process that serves these definitions loads them: the webserver, the daemon, each run the
daemon launches, `flywheel run`. So the assets import the heavy libraries of `training` (torch,
Lightning, FFCV and its numba compilation, ONNX Runtime, W&B) inside their functions, and only the
runs that use them pay for them: the definitions load in a few seconds instead of ~25
(`tests/test_definitions_load.py` keeps it so)."""

"""Dagster for flywheel: assets, resources, jobs, schedules, sensors and checks. Thin by design: an
asset gathers its inputs, calls one library function from `transforms` or `training`, and records
metadata."""

"""Data logic of flywheel: landing validation, image decoding and statistics, quarantine, warehouse
loading, dataset records and drift statistics. Plain polars/duckdb/numpy code — never Dagster."""

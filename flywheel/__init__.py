"""The `flywheel` command: land, simulate, run (a tick of the daemon's own sensors), predict, rollback, status."""

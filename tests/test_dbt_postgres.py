"""The dbt models build on PostgreSQL as on DuckDB: a real server, started by the test on a loopback
port under a non-root user, gets the tables ingestion wrote to DuckDB; `dbt build --target postgres`
must give every image the same label, label source, split bucket and statistics, on a first build
and on an incremental one after a new batch and a late label file."""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest

from tests.conftest import resources_for
from tests.test_ingestion import ingest
from tests.test_pipeline_e2e import assets
from transforms.simulate import SimulationSpec, simulate_batches

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parent.parent
DBT = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "dbt"
SOURCE_TABLES = ("raw_images", "raw_labels", "classes", "quarantined_images")
# DuckDB column types as PostgreSQL spells them (the source tables use no others).
POSTGRES_TYPES = {
    "VARCHAR": "text", "BLOB": "bytea", "BOOLEAN": "boolean", "SMALLINT": "smallint", "INTEGER": "integer",
    "BIGINT": "bigint", "FLOAT": "real", "DOUBLE": "double precision", "DATE": "date",
    "TIMESTAMP": "timestamp", "TIMESTAMP WITH TIME ZONE": "timestamptz",
}
SCHEMA = "flywheel"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def postgres():
    """A PostgreSQL server on 127.0.0.1 in a temporary folder, as a non-root user; skipped, saying
    why, only when the server cannot start here."""
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not binaries:
        pytest.skip("PostgreSQL is not installed (Debian's `postgresql` package; `make system-packages` installs it)")
    bin_dir = binaries[-1]
    run_as: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = "postgres" if _user_exists("postgres") else "nobody"
        account = pwd.getpwnam(user)
        os.chown(folder, account.pw_uid, account.pw_gid)
        run_as = ["runuser", "-u", user, "--"]
    port = _free_port()
    data, log = folder / "data", folder / "server.log"

    def pg(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([*run_as, str(bin_dir / command[0]), *command[1:]], capture_output=True, text=True, timeout=120)

    initialised = pg("initdb", "-D", str(data), "-U", "flywheel", "--auth=trust", "-E", "UTF8", "--no-sync")
    started = initialised.returncode == 0 and pg(
        "pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "start",
        "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off",
    ).returncode == 0
    if not started:
        why = (initialised.stderr or (log.read_text() if log.exists() else "")).strip().splitlines()
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"the PostgreSQL server could not start: {why[-1] if why else 'no message'}")
    try:
        _execute(port, "postgres", "CREATE DATABASE flywheel")
        _execute(port, "flywheel", f"CREATE SCHEMA {SCHEMA}")
        yield port
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@contextmanager
def _connect(port: int, database: str = "flywheel"):
    """An autocommit connection, closed on leaving (psycopg2's own `with` opens a transaction instead)."""
    import psycopg2  # dbt-postgres's driver

    connection = psycopg2.connect(host="127.0.0.1", port=port, user="flywheel", dbname=database)
    connection.autocommit = True
    try:
        yield connection
    finally:
        connection.close()


def _execute(port: int, database: str, sql: str) -> None:
    with _connect(port, database) as connection, connection.cursor() as cursor:
        cursor.execute(sql)


def copy_sources(home: Path, port: int) -> None:
    """Ingestion's tables, as they are in the DuckDB warehouse, into the PostgreSQL schema."""
    from psycopg2.extras import execute_values

    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as warehouse, _connect(port) as connection:
        with connection.cursor() as cursor:
            for table in SOURCE_TABLES:
                columns = warehouse.execute(f"DESCRIBE {table}").fetchall()
                cursor.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA}.{table} ({', '.join(f'{name} {POSTGRES_TYPES[kind]}' for name, kind, *_ in columns)})")
                cursor.execute(f"TRUNCATE {SCHEMA}.{table}")  # dbt's views over it stay
                rows = warehouse.execute(f"SELECT * FROM {table}").fetchall()
                if rows:
                    execute_values(cursor, f"INSERT INTO {SCHEMA}.{table} VALUES %s", rows)


def dbt_build_on_postgres(port: int, target_path: Path) -> None:
    environment = {**os.environ, "FLYWHEEL_PG_PORT": str(port), "FLYWHEEL_PG_SCHEMA": SCHEMA}
    completed = subprocess.run(
        [str(DBT), "build", "--target", "postgres", "--project-dir", "dbt_project", "--profiles-dir", "dbt_project",
         "--target-path", str(target_path), "--log-path", str(target_path / "logs")],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-4000:]


MODEL_QUERIES = {
    "int_images": "SELECT image_id, batch_id, label, label_source, split_bucket, split FROM {schema}int_images",
    "training_examples": "SELECT image_id, batch_id, label, label_source, split FROM {schema}training_examples",
    "batch_image_stats": "SELECT image_id, batch_id, split, brightness, contrast, saturation, sharpness, aspect_ratio, megapixels FROM {schema}batch_image_stats",
}


def models_on_duckdb(home: Path) -> dict[str, pl.DataFrame]:
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as warehouse:
        return {name: warehouse.execute(sql.format(schema="")).pl().sort("image_id") for name, sql in MODEL_QUERIES.items()}


def models_on_postgres(port: int) -> dict[str, pl.DataFrame]:
    frames = {}
    with _connect(port) as connection, connection.cursor() as cursor:
        for name, sql in MODEL_QUERIES.items():
            cursor.execute(sql.format(schema=f"{SCHEMA}."))
            frames[name] = pl.DataFrame(cursor.fetchall(), schema=[column.name for column in cursor.description], orient="row").sort("image_id")
    return frames


def assert_same_models(home: Path, port: int) -> None:
    on_duckdb, on_postgres = models_on_duckdb(home), models_on_postgres(port)
    for name in MODEL_QUERIES:
        expected, actual = on_duckdb[name], on_postgres[name].cast(on_duckdb[name].schema)
        assert expected.height > 0, name
        assert expected.equals(actual), f"{name} differs between DuckDB and PostgreSQL:\n{expected}\n{actual}"


def test_the_dbt_models_build_on_postgresql_with_the_same_results_as_on_duckdb(home: Path, postgres: int, tmp_path: Path):
    resources, instance = resources_for(home), dg.DagsterInstance.ephemeral()
    simulate_batches(home / "landing", SimulationSpec(batches=1, batch_size=150, prefix="cam"))
    simulate_batches(home / "landing", SimulationSpec(batches=1, batch_size=40, labeled=False, prefix="night", offset=150))
    assert ingest("cam-000", resources, instance).success and ingest("night-000", resources, instance).success
    assert dg.materialize(assets("raw_labels", "stg_images"), resources=resources, instance=instance).success
    copy_sources(home, postgres)
    dbt_build_on_postgres(postgres, tmp_path / "dbt")
    assert_same_models(home, postgres)

    # Incremental builds on both: a new batch, and late labels for images already transformed.
    simulate_batches(home / "landing", SimulationSpec(batches=1, batch_size=50, prefix="dusk", offset=190))
    labels = home / "landing" / "labels"
    labels.mkdir()
    pl.DataFrame({"image_id": ["night-000-00000", "night-000-00001", "cam-000-00003"], "label": [1, 2, 9]}).write_parquet(labels / "late.parquet")
    time.sleep(0.01)
    assert ingest("dusk-000", resources, instance).success
    assert dg.materialize(assets("raw_labels", "stg_images"), resources=resources, instance=instance).success
    copy_sources(home, postgres)
    dbt_build_on_postgres(postgres, tmp_path / "dbt")
    assert_same_models(home, postgres)
    late = models_on_postgres(postgres)["training_examples"].filter(pl.col("label_source") == "label_file")
    assert sorted(late["image_id"].to_list()) == ["cam-000-00003", "night-000-00000", "night-000-00001"]
    assert set(models_on_postgres(postgres)["int_images"]["batch_id"]) == {"cam-000", "night-000", "dusk-000"}

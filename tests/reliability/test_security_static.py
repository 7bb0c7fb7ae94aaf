"""Static security checks over the project's own source (flywheel, orchestration, training, transforms, bench).

- Nothing is deserialized with pickle: loading a pickle runs arbitrary code, and the files this
  project reads (landed batches, checkpoints, embeddings) live in a data root anyone may write to.
- SQL text is never assembled from values: values go in as DuckDB parameters, so a batch id or a
  label file cannot inject SQL.
- `make dev` serves the Dagster UI on localhost only: the UI launches runs and has no login.

The code checks parse the source with `ast`; each checker is tested against known bad and good
snippets so it cannot pass by seeing nothing.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path
from typing import Iterator

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SOURCE_FOLDERS = ("flywheel", "orchestration", "training", "transforms", "bench")

PICKLE_MODULES = {"pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_LOADS = {"pickle.load", "pickle.loads"}
SQL_METHODS = {"execute", "executemany", "sql", "query"}


def source_files() -> list[Path]:
    files = sorted(path for folder in SOURCE_FOLDERS for path in (PROJECT_ROOT / folder).rglob("*.py"))
    assert files, f"no Python files found under {SOURCE_FOLDERS} in {PROJECT_ROOT}"
    return files


def problems_in_project(checker) -> list[str]:
    problems = []
    for path in source_files():
        problems += checker(path.read_text(encoding="utf-8"), str(path.relative_to(PROJECT_ROOT)))
    return problems


def imported_names(tree: ast.AST) -> dict[str, str]:
    """Each name an import binds, mapped to what it stands for: `np` -> `numpy`, `load` -> `torch.load`."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def qualified_name(expression: ast.expr, imported: dict[str, str]) -> str | None:
    """`np.load` -> `numpy.load` given `import numpy as np`; None unless a dotted name."""
    attributes = []
    while isinstance(expression, ast.Attribute):
        attributes.append(expression.attr)
        expression = expression.value
    if not isinstance(expression, ast.Name):
        return None
    return ".".join([imported.get(expression.id, expression.id), *reversed(attributes)])


def imported_modules(node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif node.module and node.level == 0:
        yield node.module


def passes_literal(call: ast.Call, keyword: str, value: bool) -> bool:
    return any(
        argument.arg == keyword and isinstance(argument.value, ast.Constant) and argument.value.value is value
        for argument in call.keywords
    )


def pickle_problems(source: str, filename: str) -> list[str]:
    tree = ast.parse(source, filename)
    imported = imported_names(tree)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for module in imported_modules(node):
                if module.split(".")[0] in PICKLE_MODULES:
                    problems.append(f"{filename}:{node.lineno}: imports {module}")
        elif isinstance(node, ast.Call):
            name = qualified_name(node.func, imported)
            if name is None:
                continue
            if name in PICKLE_LOADS or name.rsplit(".", 1)[-1] == "read_pickle":
                problems.append(f"{filename}:{node.lineno}: {name} unpickles")
            elif name == "torch.load" and not passes_literal(node, "weights_only", True):
                problems.append(f"{filename}:{node.lineno}: torch.load without weights_only=True")
            elif name == "numpy.load" and not passes_literal(node, "allow_pickle", False):
                problems.append(f"{filename}:{node.lineno}: numpy.load without allow_pickle=False")
    return problems


def module_constants(tree: ast.Module) -> set[str]:
    """ALL_CAPS names assigned at module level."""
    targets = []
    for statement in tree.body:
        if isinstance(statement, ast.Assign):
            targets += statement.targets
        elif isinstance(statement, ast.AnnAssign):
            targets.append(statement.target)
    return {target.id for target in targets if isinstance(target, ast.Name) and target.id.isupper()}


def sql_text_argument(call: ast.Call) -> ast.expr | None:
    if call.args:
        return call.args[0]
    # SQL passed by keyword (`execute(query=...)`) is checked the same way.
    return next((keyword.value for keyword in call.keywords if keyword.arg in ("query", "sql")), None)


def why_sql_is_not_constant(argument: ast.expr, constants: set[str]) -> str | None:
    if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
        return None
    if isinstance(argument, ast.Name) and argument.id in constants:
        return None
    if isinstance(argument, ast.JoinedStr):
        return "SQL built with an f-string"
    if isinstance(argument, ast.BinOp):
        return "SQL built with % or +"
    if (
        isinstance(argument, ast.Call)
        and isinstance(argument.func, ast.Attribute)
        and argument.func.attr == "format"
    ):
        return "SQL built with .format()"
    if isinstance(argument, ast.Name):
        return f"SQL from {argument.id}, not a module-level ALL_CAPS constant"
    return "SQL is neither a string literal nor a module-level constant"


def sql_problems(source: str, filename: str) -> list[str]:
    tree = ast.parse(source, filename)
    constants = module_constants(tree)
    problems = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SQL_METHODS):
            continue
        argument = sql_text_argument(node)
        reason = why_sql_is_not_constant(argument, constants) if argument else None
        if reason:
            segment = " ".join((ast.get_source_segment(source, node) or "").split())
            problems.append(f"{filename}:{node.lineno}: {reason}: {segment}")
    return problems


def test_nothing_is_loaded_with_pickle():
    problems = problems_in_project(pickle_problems)
    assert not problems, "pickle can run code on load:\n" + "\n".join(problems)


def test_sql_is_never_built_from_values():
    problems = problems_in_project(sql_problems)
    assert not problems, "SQL built from values (pass them as parameters):\n" + "\n".join(problems)


CAUGHT = [
    *((pickle_problems, f"import {module}") for module in sorted(PICKLE_MODULES)),
    (pickle_problems, "from joblib import load"),
    (pickle_problems, "import dill.settings"),
    (pickle_problems, "pickle.loads(data)"),
    (pickle_problems, "import pandas as pd\nframe = pd.read_pickle(path)"),
    (pickle_problems, "import polars as pl\nframe = pl.read_pickle(path)"),
    (pickle_problems, "import torch\nstate = torch.load(p)"),
    (pickle_problems, "import torch\nstate = torch.load(p, weights_only=False)"),
    (pickle_problems, "import torch\nstate = torch.load(p, weights_only=trusted)"),
    (pickle_problems, "from torch import load\nstate = load(p)"),
    (pickle_problems, "import numpy as np\narray = np.load(p)"),
    (pickle_problems, "import numpy\narray = numpy.load(p, allow_pickle=True)"),
    (sql_problems, 'con.execute(f"select * from {table}")'),
    (sql_problems, 'con.execute("select " + x)'),
    (sql_problems, 'con.execute("select %s" % x)'),
    (sql_problems, 'con.execute("select {}".format(x))'),
    (sql_problems, 'con.executemany(statement, rows)'),
    (sql_problems, 'con.execute(query=f"select * from {table}")'),
    (sql_problems, 'frame.query(f"label == {label}")'),
    (sql_problems, 'def read(con):\n    query = "select 1"\n    return con.sql(query)'),
    (sql_problems, 'schema = "create table t (x int)"\ncon.execute(schema)'),
    (sql_problems, "def read(con, SCHEMA):\n    con.execute(SCHEMA)"),
]

PASSED = [
    (pickle_problems, "import torch\nstate = torch.load(p, map_location='cpu', weights_only=True)"),
    (pickle_problems, "import numpy as np\narray = np.load(p, allow_pickle=False)"),
    (pickle_problems, "import json\ndocument = json.load(handle)"),
    (sql_problems, 'con.execute("DELETE FROM t WHERE id = $id", {"id": x})'),
    (sql_problems, 'con.execute("SELECT * FROM t " "WHERE id = $id", {"id": x}).pl()'),
    (sql_problems, 'SCHEMA_DDL = "CREATE TABLE t (x INT)"\n\ndef create(con):\n    con.execute(SCHEMA_DDL)'),
    (sql_problems, "con.commit()"),
]


def test_the_checkers_catch_what_they_look_for():
    missed = [
        f"{checker.__name__} missed: {snippet!r}" for checker, snippet in CAUGHT if not checker(snippet, "bad.py")
    ]
    false_alarms = [problem for checker, snippet in PASSED for problem in checker(snippet, "good.py")]
    assert not missed + false_alarms, "\n".join(missed + false_alarms)


def test_make_dev_binds_localhost_only():
    dry_run = subprocess.run(
        ["make", "-n", "dev"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert dry_run.returncode == 0, dry_run.stderr
    output = dry_run.stdout.replace("\\\n", " ")  # one line per command, continuations joined
    dagster_dev = [line for line in output.splitlines() if "dagster dev" in line]
    assert len(dagster_dev) == 1, f"expected one `dagster dev` command in `make -n dev`:\n{dry_run.stdout}"
    words = dagster_dev[0].split()
    hosts = [value for option, value in zip(words, words[1:]) if option in ("-h", "--host")]
    hosts += [word.removeprefix("--host=") for word in words if word.startswith("--host=")]
    assert hosts and set(hosts) == {"127.0.0.1"}, f"dagster dev must bind 127.0.0.1 only: {dagster_dev[0]}"
    assert "0.0.0.0" not in dry_run.stdout + dry_run.stderr

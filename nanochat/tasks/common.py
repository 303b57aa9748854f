"""Loading task files as the public sets ship them: JSONL (one JSON object per line) or parquet."""
from __future__ import annotations

from pathlib import Path

from nanochat.errors import ConfigError
from nanochat.conversations import jsonl_lines

FIXTURES_DIR = Path(__file__).resolve().parent.parent / "eval_fixtures"


def resolve_data_dir(data_dir: str, base_dir: str) -> Path:
    """"fixtures" = the small sets in the repository; "" = <base_dir>/eval_data (where the data
    stage or the user puts the real sets); anything else is a folder."""
    if data_dir == "fixtures":
        return FIXTURES_DIR
    if data_dir:
        return Path(data_dir)
    from nanochat.files import get_base_dir
    return Path(base_dir or get_base_dir()) / "eval_data"


def find_task_file(data_dir: Path, stem: str) -> Path:
    for suffix in (".parquet", ".jsonl"):
        path = data_dir / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise ConfigError(f"{data_dir / stem}.parquet: task data not found (nor .jsonl); fetch it where the network "
                      f"is (a data stage's evals: [{stem}], or python -m jobs data fetch --evals {stem}), put the set "
                      "there, or use data_dir: fixtures")


def load_records(path: Path) -> list[dict]:
    """Every record of a JSONL or parquet file as plain Python values; a bad line is a ConfigError
    naming the file and the line."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:
            raise ConfigError(f"{path}: unreadable parquet ({type(e).__name__}: {str(e)[:200]})") from None
    records = []
    for where, record in jsonl_lines(path):
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        records.append(record)
    return records


def require(record: dict, keys: tuple, path: Path, index: int) -> None:
    for k in keys:
        if k not in record:
            raise ConfigError(f"{path}: record {index} lacks key {k!r}")

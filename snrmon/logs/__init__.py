"""Reading loss logs (CSV tables; TensorBoard runs, Lightning metrics.csv and Hugging Face trainer_state.json
logs of scalars) into tables, and choosing rows with a safe expression."""

from snrmon.logs.tables import LogError, Table, read_csv, read_table, read_tensorboard
from snrmon.logs.where import WhereError, where

__all__ = ["LogError", "Table", "WhereError", "read_csv", "read_table", "read_tensorboard", "where"]

"""snrmon.logs: CSV and TensorBoard tables, dropping missing rows, the safe --where expression language."""

from __future__ import annotations

import json

import numpy as np
import pytest

from snrmon.logs import LogError, Table, read_csv, read_table, read_tensorboard
from snrmon.logs.where import WhereError, where

TOKENS_PER_STEP = 1000.0
STEPS = list(range(0, 500, 50))  # step 0 included: it must be skipped (D = 0)


def write_runs(root, runs: dict[str, float | None], tags=("val/loss", "train/loss")) -> None:
    """One TensorBoard run per name (in name/version_0, as Lightning lays them out), hparams.yaml with N."""
    from torch.utils.tensorboard import SummaryWriter

    for name, n in runs.items():
        directory = root / name / "version_0"
        writer = SummaryWriter(str(directory))
        for step in STEPS:
            for offset, tag in enumerate(tags):
                writer.add_scalar(tag, 3.0 + offset - step / 1000.0, step)
        writer.close()
        if n is not None:
            (directory / "hparams.yaml").write_text(f"lr: 0.001\nn_params: {int(n)}\nwidth: 64\n")


def write_csv(path, text: str):
    path.write_text(text)
    return path


# --- CSV ------------------------------------------------------------------------------------------------


def test_csv_numeric_and_text_columns_and_missing_cells(tmp_path):
    path = write_csv(
        tmp_path / "runs.csv",
        "model,N,D,loss,group\nm1,1e6,100,3.5,a\nm2,2e6,200,,b\nm3,3e6, 300 ,NaN,a\n",
    )
    table = read_csv(path)
    assert len(table) == 3
    assert table.names == ["model", "N", "D", "loss", "group"]
    assert table.is_numeric("N") and table.is_numeric("loss") and not table.is_numeric("model")
    np.testing.assert_array_equal(table["D"], [100.0, 200.0, 300.0])
    assert list(table["model"]) == ["m1", "m2", "m3"]
    assert np.isnan(table["loss"][1:]).all()

    kept, dropped = table.dropna(["loss"])
    assert dropped == 2 and len(kept) == 1 and kept["model"][0] == "m1"
    assert table.dropna(["N", "D"])[1] == 0  # only the columns asked for count

    chosen = table.select(table["group"] == "a")
    assert list(chosen["model"]) == ["m1", "m3"]


def test_dropna_counts_infinities_too():
    table = Table({"loss": np.array([1.0, np.inf, np.nan, 2.0]), "name": np.array(list("abcd"))})
    kept, dropped = table.dropna()
    assert dropped == 2
    assert list(kept["name"]) == ["a", "d"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("N,D,loss\n", "no rows"),
        ("N,D,loss\n1,2,3\n1,2\n", "line 3"),
        ("N,N,loss\n1,2,3\n", "distinct"),
    ],
)
def test_bad_csv_files(tmp_path, text, message):
    with pytest.raises(LogError, match=message):
        read_csv(write_csv(tmp_path / "bad.csv", text))


def test_read_table_missing_path(tmp_path):
    with pytest.raises(LogError, match="no such file"):
        read_table(tmp_path / "absent.csv")


# --- TensorBoard ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    write_runs(root, {"small": 1e6, "big": 4e6})
    return root


def test_tensorboard_runs_become_groups_with_n_from_hparams(runs_dir):
    table = read_tensorboard(runs_dir, "val/loss", tokens_per_step=TOKENS_PER_STEP)
    logged = [s for s in STEPS if s > 0]
    assert len(table) == 2 * len(logged)
    assert set(table["group"]) == {"small/version_0", "big/version_0"}
    for group, n in (("small/version_0", 1e6), ("big/version_0", 4e6)):
        rows = table["group"] == group
        assert set(table["N"][rows]) == {n}
        np.testing.assert_array_equal(table["step"][rows], logged)
        np.testing.assert_allclose(table["D"][rows], np.array(logged) * TOKENS_PER_STEP)
        np.testing.assert_allclose(table["loss"][rows], 3.0 - np.array(logged) / 1000.0, rtol=1e-6)
    assert any("step 0" in note for note in table.notes)


def test_tensorboard_n_option_overrides_and_steps_by_default(runs_dir):
    table = read_table(runs_dir, tag="train/loss", n=123.0)
    assert set(table["N"]) == {123.0}
    np.testing.assert_array_equal(table["D"], table["step"])  # tokens_per_step defaults to 1: D in steps


def test_tensorboard_tag_errors_list_the_tags(runs_dir):
    with pytest.raises(LogError, match="likely loss tags: val/loss, train/loss"):
        read_tensorboard(runs_dir, "val/acc")
    with pytest.raises(LogError, match="--tag"):
        read_tensorboard(runs_dir, None)  # two tags: the choice must be explicit


def test_tensorboard_without_tag_suggests_loss_tags_first(tmp_path):
    tags = [
        "epoch",
        "hp_metric",
        "lr-AdamW",
        *(f"snr/group_{i}" for i in range(60)),
        "train/loss",
        "val/loss",
        "snr/forecast/val/loss/train_loss",  # BasinEarlyStopping's own series: no loss of the run's
        "~snr/loss/val_loss",
    ]
    write_runs(tmp_path, {"a": 1e6}, tags=tags)  # a Lightning run logs dozens of scalars
    with pytest.raises(LogError) as error:
        read_tensorboard(tmp_path, None)
    message = str(error.value)
    assert message.startswith("choose the loss scalar with --tag; likely loss tags: val/loss, train/loss (")
    assert f"{len(tags) - 2} other tags" in message and len(message) < 200  # counted, not listed
    with pytest.raises(LogError, match="no scalar tag 'loss'.*likely loss tags: val/loss, train/loss"):
        read_tensorboard(tmp_path, "loss")


def test_a_tensorboard_run_is_read_once_until_its_files_change(tmp_path, monkeypatch):
    """A replay reads several tags of one run (the metric, and the forecast's series): its files are read
    once (thousands of them take minutes), and again when they change (a run still being written)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reloads = []
    reload = EventAccumulator.Reload
    monkeypatch.setattr(EventAccumulator, "Reload", lambda self: reloads.append(1) or reload(self))
    write_runs(tmp_path, {"a": 1e6})
    read_tensorboard(tmp_path, "val/loss")
    read_tensorboard(tmp_path, "train/loss")
    assert len(reloads) == 1
    write_runs(tmp_path, {"a": 1e6}, tags=("val/loss", "train/loss", "val/acc"))  # a second event file
    assert len(read_tensorboard(tmp_path, "val/acc")) == len(STEPS) - 1  # (step 0 skipped)
    assert len(reloads) == 2


def test_tensorboard_single_tag_is_chosen_and_missing_n_leaves_no_n_column(tmp_path):
    write_runs(tmp_path, {"a": None, "b": None}, tags=("loss",))
    table = read_tensorboard(tmp_path, None)
    assert "N" not in table and len(table) == 2 * (len(STEPS) - 1)


def test_tensorboard_partial_model_sizes_are_an_error(tmp_path):
    write_runs(tmp_path, {"a": 1e6, "b": None}, tags=("loss",))
    with pytest.raises(LogError, match="b/version_0"):
        read_tensorboard(tmp_path, "loss")


def test_tensorboard_scalars_written_as_tensors_read_as_scalars(tmp_path):
    """TF2's tf.summary.scalar and Keras write one-value tensors of the scalars plugin, which TensorBoard
    shows as scalars: they are read as scalars, every one of them (not a sample of 10)."""
    from tensorboard.compat.proto import types_pb2
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from torch.utils.tensorboard import SummaryWriter

    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="scalars"))
    writer = SummaryWriter(str(tmp_path / "keras"))
    steps = range(1, 31)
    for step in steps:
        value = TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[3.0 - step / 64], tensor_shape={})
        summary = Summary(value=[Summary.Value(tag="epoch_loss", metadata=metadata, tensor=value)])
        writer._get_file_writer().add_summary(summary, step)
    writer.close()
    table = read_tensorboard(tmp_path, "epoch_loss")
    assert table["step"].tolist() == list(steps)
    assert table["loss"].tolist() == [3.0 - step / 64 for step in steps]


def test_tensorboard_directory_without_events(tmp_path):
    with pytest.raises(LogError, match="no TensorBoard event files"):
        read_tensorboard(tmp_path, "loss")
    # A CSVLogger's run directory: the file to give instead is named.
    (tmp_path / "version_0").mkdir()
    write_csv(tmp_path / "version_0" / "metrics.csv", "step,loss\n1,2.0\n")
    with pytest.raises(LogError, match="give a log file instead, e.g. .*version_0/metrics.csv"):
        read_table(tmp_path, "loss")
    # The version directory itself, holding the one log file: that file is read.
    assert read_table(tmp_path / "version_0", "loss")["loss"].tolist() == [2.0]


# --- where ----------------------------------------------------------------------------------------------


@pytest.fixture
def table():
    return Table(
        {
            "N": np.array([1e6, 1e7, 1e8, 1e9]),
            "D": np.array([1e9, 5e9, 2e10, 1e11]),
            "group": np.array(["a", "b", "a", "c"]),
        }
    )


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("N <= 1e7", [1, 1, 0, 0]),
        ("N < 1e7 or D >= 2e10", [1, 0, 1, 1]),
        ("N >= 1e7 and D != 2e10", [0, 1, 0, 1]),
        ("1e6 < N <= 1e8", [0, 1, 1, 0]),  # chained
        ("not (N > 1e7)", [1, 1, 0, 0]),
        ("(N > 1e6 and N < 1e9) or group == 'c'", [0, 1, 1, 1]),
        ('group != "a"', [0, 1, 0, 1]),
        ("D > -1", [1, 1, 1, 1]),
        ("N < D", [1, 1, 1, 1]),  # column against column
        ("  N ==  1e9 ", [0, 0, 0, 1]),
    ],
)
def test_where_allowed(table, expression, expected):
    np.testing.assert_array_equal(where(table, expression), np.array(expected, dtype=bool))


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('echo hacked')", "function calls"),
        ("__import__('os')", "function calls"),
        ("N.real > 1", "attribute access"),
        ("N * 2 > 1", "arithmetic"),
        ("N[0] > 1", "indexing"),
        ("N in (1, 2)", "'in'"),
        ("N is None", "'is'"),
        ("(lambda: 1)() > 0", "function calls"),
        ("N > True", "True"),
        ("D", "not a condition"),
        ("1", "not a condition"),
        ("(N > 1) > 0", "cannot be compared"),
        ("N <", "invalid expression"),
        ("", "invalid expression"),
        ("params > 1", "unknown column 'params'"),
        ("group > 'a'", "only be compared with == or !="),
        ("group == 1", "compares text with a number"),
        ("N == 'a'", "compares text with a number"),
        ("not " * 5000 + "N > 1", "nested too deeply"),  # Python's parser gives up: a reason, not a crash
    ],
)
def test_where_rejected(table, expression, message):
    with pytest.raises(WhereError, match=message.replace("(", r"\(").replace("[", r"\[")):
        where(table, expression)


def test_where_never_runs_python(table, tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(WhereError):
        where(table, f"__import__('pathlib').Path({str(marker)!r}).touch() == 0")
    assert not marker.exists()


# --- Lightning metrics.csv and Hugging Face trainer_state.json -----------------------------------------

METRICS_CSV = """\
epoch,step,train_loss,val_loss
0,0,3.0,
0,1,2.5,
0,1,,2.9
1,2,2.0,
1,3,1.5,
1,3,,2.4
1,3,1.4,
"""


def test_lightning_metrics_csv_reads_like_a_tensorboard_run(tmp_path):
    run = tmp_path / "version_0"
    run.mkdir()
    path = write_csv(run / "metrics.csv", METRICS_CSV)
    (run / "hparams.yaml").write_text("n_params: 5000\n")  # CSVLogger writes it beside metrics.csv
    table = read_table(path, tag="val_loss", tokens_per_step=10.0)
    assert table.tag == "val_loss" and table["group"].tolist() == ["version_0"] * 2
    assert table["step"].tolist() == [1.0, 3.0] and table["D"].tolist() == [10.0, 30.0]
    assert table["loss"].tolist() == [2.9, 2.4] and table["N"].tolist() == [5000.0] * 2
    # The training loss: step 0 skipped (D = 0), and the last value logged at a step wins (a resumed run).
    train = read_table(path, tag="train_loss")
    assert train["step"].tolist() == [1.0, 2.0, 3.0] and train["loss"].tolist() == [2.5, 2.0, 1.4]
    assert any("step 0" in note for note in train.notes)
    with pytest.raises(
        LogError, match="choose the loss scalar with --tag; likely loss tags: val_loss, train_loss"
    ):
        read_table(path)


def test_a_metrics_csv_of_one_metric_is_a_step_log_too(tmp_path):
    """Lightning logs ``epoch`` with every metric: a metrics.csv of the validation loss alone, two validations
    a step (val_check_interval below the accumulation), is one run's log, the last value at a step winning."""
    text = "epoch,step,val_loss\n0,0,6.0\n0,0,6.0\n0,1,5.0\n0,1,4.5\n0,-3,7.0\n"
    table = read_table(write_csv(tmp_path / "metrics.csv", text), tag="val_loss")
    assert table["step"].tolist() == [1.0] and table["loss"].tolist() == [4.5]
    assert "2 values at step 0 or below (D ≤ 0) skipped in 1 run" in table.notes  # (steps 0 and −3)
    (tmp_path / "half").mkdir()
    with pytest.raises(LogError, match="step 1.5 on row 2 after the header is not a whole number"):
        read_table(write_csv(tmp_path / "half" / "metrics.csv", "epoch,step,val_loss\n0,1,6.0\n0,1.5,5.0\n"))
    # Tables that are not Lightning's: another name, or a text column (a run's name), read as they are.
    for name, stacked in (("seeds.csv", "epoch,step,seed,val_loss\n0,1,1,2.0\n0,1,2,2.1\n"),
                          ("metrics.csv", "epoch,step,name,val_loss\n0,1,a,2.0\n0,1,b,2.1\n")):  # fmt: skip
        (tmp_path / "t").mkdir(exist_ok=True)
        table = read_table(write_csv(tmp_path / "t" / name, stacked), tag="val_loss")
        assert table.tag is None and table.names == stacked.split("\n")[0].split(",")


@pytest.mark.parametrize(
    "text",
    [
        "step,loss,train\n1,2.0,2.1\n2,1.9,2.0\n",  # one curve, every row complete
        "step,loss,train\n1,2.0,2.1\n2,,2.0\n3,1.8,1.9\n",  # a missing cell is no other metric's row
        "group,step,train_loss,val_loss\na,1,2.0,\na,1,,2.1\n",  # a table of runs
    ],
)
def test_csv_tables_that_are_no_step_logs_read_as_they_are(tmp_path, text):
    table = read_table(write_csv(tmp_path / "table.csv", text), tag="loss")
    assert table.tag is None and table.names == text.split("\n")[0].split(",")


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"global_step": 3}', "without a log_history list"),
        ("[1, 2, 3]", "without a log_history list"),  # (not a CSV "with a header but no rows")
        ('{"log_history": [{"loss": 1.0}]}', r"log_history\[0\] has no whole-number step"),
        ('{"log_history": [1]}', r"log_history\[0\] is not an object"),
        ('{"log_history": [{"step": 1, "loss": 1.0}', "cannot read .* as JSON"),
    ],
)
def test_bad_trainer_states(tmp_path, text, message):
    with pytest.raises(LogError, match=message):
        read_table(write_csv(tmp_path / "trainer_state.json", text), tag="loss")


def test_trainer_state_scalars_are_its_numbers(tmp_path):
    history = [
        {"step": 10, "loss": 2.0, "learning_rate": 1e-3, "epoch": 0.5},
        {"step": 10, "eval_loss": 2.2, "eval_runtime": 1.0},
        {"step": 20, "loss": 1.5, "note": "text", "flag": True, "nested": {"a": 1}},
    ]
    path = write_csv(tmp_path / "trainer_state.json", json.dumps({"log_history": history}))
    assert read_table(path, tag="loss")["loss"].tolist() == [2.0, 1.5]
    assert read_table(path, tag="eval_loss")["step"].tolist() == [10.0]
    with pytest.raises(LogError, match="no scalar tag 'flag'"):  # a boolean is no scalar
        read_table(path, tag="flag")


def test_a_logged_nan_is_a_value_a_blank_cell_is_none(tmp_path):
    """A diverged loss is logged as nan: kept at its step, as TensorBoard keeps it, while a blank cell is a
    metric not logged on that row."""
    path = write_csv(tmp_path / "metrics.csv", METRICS_CSV.replace("0,1,,2.9", "0,1,,nan"))
    table = read_table(path, tag="val_loss")
    assert table["step"].tolist() == [1.0, 3.0] and np.isnan(table["loss"][0]) and table["loss"][1] == 2.4
    history = [{"step": 1, "eval_loss": float("nan")}, {"step": 2, "eval_loss": float("inf")}]
    state = write_csv(tmp_path / "trainer_state.json", json.dumps({"log_history": history}))  # NaN, Infinity
    assert read_table(state, tag="eval_loss")["step"].tolist() == [1.0, 2.0]

"""The snrmon command line, driven in-process through snrmon.cli.main, and once as the installed script."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_forecast import X, improving_curve, u_curve

from snrmon.cli import fit as fit_verb
from snrmon.cli import forecast as forecast_verb
from snrmon.cli import main
from snrmon.laws import LAWS, get_law
from snrmon.laws.fitting import FitError
from snrmon.laws.study import BASIN_GRID, applicable_laws
from snrmon.logs import Table

REPO = Path(__file__).resolve().parents[1]
PYTHIA = REPO / "data" / "pythia_deduped_lambada_loss.csv"

NOISE = 0.003  # relative (log-normal) noise on the generated losses
CHINCHILLA = np.array([1.7, 400.0, 0.34, 410.0, 0.28])  # E, A, alpha, B, beta
SHANNON = np.array([2.6e-4, 0.61, 0.46, 2.0, 3.1e5, 0.83, 0.59, 0.97])  # a basin inside the D range at 7e7
N_VALUES = [1e7, 3e7, 1e8, 3e8]
D_VALUES = np.geomspace(1e8, 1e10, 15)
FAST = [
    "--starts",
    "16",
    "--refine",
    "2",
]  # small multi-start: the tests check the plumbing, not the optimiser
SPLIT = "D <= 2e9"

FIT_KEYS = {
    "law",
    "params",
    "params_ci",
    "r2_train",
    "r2_test",
    "rmse_test",
    "n_train",
    "n_test",
    "d_star",
    "dropped_rows",
    "warnings",
}


def generate(law_name, theta, n_values, d_values, seed=0):
    """Rows N, D, loss of a law with known constants, with log-normal noise of size NOISE."""
    n = np.repeat(n_values, len(d_values))
    d = np.tile(d_values, len(n_values))
    clean = get_law(law_name).loss(theta, {"N": n, "D": d})
    return n, d, clean * np.exp(np.random.default_rng(seed).normal(0.0, NOISE, len(n)))


def write_csv(path, columns: dict) -> Path:
    names = list(columns)
    lines = [",".join(names)]
    lines += [",".join(str(value) for value in row) for row in zip(*columns.values(), strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def chinchilla(tmp_path_factory):
    n, d, loss = generate("chinchilla", CHINCHILLA, N_VALUES, D_VALUES)
    model = [f"m{int(v)}" for v in n]
    path = write_csv(
        tmp_path_factory.mktemp("csv") / "chinchilla.csv", {"model": model, "N": n, "D": d, "loss": loss}
    )
    return path, n, d, loss


@pytest.fixture(scope="module")
def shannon_csv(tmp_path_factory):
    n, d, loss = generate("shannon", SHANNON, [7e7, 1.6e8, 4e8, 1e9], np.geomspace(1e10, 3e11, 15))
    return write_csv(tmp_path_factory.mktemp("csv") / "shannon.csv", {"N": n, "D": d, "loss": loss}), n


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)  # exactly one JSON document: json.loads rejects anything around it


def noise_r2_floor(loss: np.ndarray) -> float:
    """The R² a fit reaches when its residuals are the added noise, with a 3x margin on their variance."""
    return 1.0 - 3.0 * NOISE**2 * np.mean(loss**2) / np.var(loss)


# --- fit ------------------------------------------------------------------------------------------------


def test_fit_json_keys_types_and_scores(chinchilla, capsys):
    path, n, d, loss = chinchilla
    doc = run_json(capsys, "fit", path, "--law", "chinchilla", *FAST, "--bootstrap", "4")
    assert FIT_KEYS <= set(doc)
    assert doc["law"] == "chinchilla"
    assert list(doc["params"]) == get_law("chinchilla").param_names
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in doc["params"].values())
    assert set(doc["params_ci"]) == set(doc["params"])
    for low, high in doc["params_ci"].values():
        assert 0 < low <= high
    assert doc["n_train"] == len(loss) and doc["n_test"] == 0
    assert doc["r2_test"] is None and doc["rmse_test"] is None  # no --train-where: no test split
    assert doc["r2_train"] >= noise_r2_floor(loss)
    assert doc["d_star"] is None  # Chinchilla's loss never turns up
    assert doc["dropped_rows"] == 0


def test_fit_shannon_reports_a_basin_per_model_size(shannon_csv, capsys):
    path, n = shannon_csv
    doc = run_json(capsys, "fit", path, "--law", "shannon", *FAST, "--bootstrap", "0")
    assert set(doc["d_star"]) == {str(int(v)) for v in np.unique(n)}
    assert all(v is None or v > 0 for v in doc["d_star"].values())
    assert doc["params_ci"] == {}  # --bootstrap 0

    code, out, _ = run(
        capsys, "fit", path, "--law", "shannon", "--starts", "8", "--refine", "1", "--bootstrap", "0"
    )
    assert code == 0
    assert "basin D*" in out
    for name in get_law("shannon").param_names:
        assert any(line.split()[:1] == [name] for line in out.splitlines())


def test_train_where_splits_and_where_filters(chinchilla, capsys):
    path, n, d, loss = chinchilla
    doc = run_json(
        capsys, "fit", path, "--law", "chinchilla", *FAST, "--bootstrap", "0", "--train-where", SPLIT
    )
    assert doc["n_train"] == int((d <= 2e9).sum())
    assert doc["n_test"] == int((d > 2e9).sum())
    assert doc["r2_test"] >= noise_r2_floor(loss[d > 2e9]) - 0.05  # extrapolation adds a little error
    assert doc["rmse_test"] > 0

    doc = run_json(
        capsys, "fit", path, "--law", "chinchilla", *FAST, "--bootstrap", "0", "--where", "N >= 3e7",
        "--train-where", SPLIT,
    )  # fmt: skip
    kept = n >= 3e7
    assert doc["n_train"] == int((kept & (d <= 2e9)).sum())
    assert doc["n_test"] == int((kept & (d > 2e9)).sum())


def test_text_report_has_constants_units_and_scores(chinchilla, capsys):
    path = chinchilla[0]
    code, out, err = run(
        capsys, "fit", path, "--law", "chinchilla", *FAST, "--bootstrap", "3", "--train-where", SPLIT
    )
    assert code == 0 and err == ""
    law = get_law("chinchilla")
    for param in law.params:
        line = next(line for line in out.splitlines() if line.split()[:1] == [param.name])
        assert param.unit in line and "[" in line  # unit and 95% interval
    assert "R²" in out
    assert any(line.startswith("train ") for line in out.splitlines())
    assert any(line.startswith("test ") for line in out.splitlines())


def test_single_run_law_fits_each_run(chinchilla, capsys, tmp_path):
    path, n, d, loss = chinchilla
    doc = run_json(capsys, "fit", path, "--law", "power", *FAST, "--bootstrap", "0", "--train-where", SPLIT)
    runs = {str(int(v)) for v in np.unique(n)}  # no group column: one run per N
    assert set(doc["params"]) == runs
    assert all(list(p) == get_law("power").param_names for p in doc["params"].values())
    assert doc["d_star"] is None  # the power law has no basin (it never turns up)
    assert doc["n_train"] + doc["n_test"] == len(loss)
    assert doc["r2_test"] is not None

    grouped = write_csv(
        tmp_path / "grouped.csv", {"group": np.where(n < 5e7, "s", "l"), "D": d, "loss": loss}
    )
    doc = run_json(capsys, "fit", grouped, "--law", "power", *FAST, "--bootstrap", "0")
    assert set(doc["params"]) == {"s", "l"}


def test_plot_problems_fail_before_the_fit(chinchilla, capsys, monkeypatch, tmp_path):
    def no_fit(*args, **kwargs):
        raise FitError("the fit ran")  # a --plot problem must be reported before this

    monkeypatch.setattr(fit_verb, "fit_data", no_fit)
    code, out, err = run(
        capsys, "fit", chinchilla[0], "--law", "chinchilla", "--plot", tmp_path / "no" / "x.png"
    )
    assert code == 2 and "cannot write" in err and out == ""
    code, out, err = run(capsys, "fit", chinchilla[0], "--law", "chinchilla", "--plot", tmp_path / "x.xyz")
    assert code == 2 and "matplotlib writes no 'xyz' files; use one of" in err and out == ""
    picture = tmp_path / "fit.png"
    code, _, err = run(capsys, "fit", chinchilla[0], "--law", "chinchilla", "--plot", picture)
    assert code == 2 and "the fit ran" in err  # a writable path passes the check ...
    assert not picture.exists()  # ... which leaves no empty file behind
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, _, err = run(capsys, "fit", chinchilla[0], "--law", "chinchilla", "--plot", picture)
    assert code == 2 and "--plot needs matplotlib" in err


def test_plot_writes_a_png(chinchilla, capsys, tmp_path):
    picture = tmp_path / "fit.png"
    code, out, err = run(
        capsys, "fit", chinchilla[0], "--law", "chinchilla", *FAST, "--bootstrap", "0",
        "--train-where", SPLIT, "--plot", picture,
    )  # fmt: skip
    assert code == 0, err
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
    assert str(picture) in out


def test_missing_values_are_dropped_and_counted(chinchilla, capsys, tmp_path):
    path, n, d, loss = chinchilla
    holes = loss.astype(object)
    holes[[3, 17, 40]] = ""
    holes[41] = "nan"
    sparse = write_csv(tmp_path / "holes.csv", {"N": n, "D": d, "loss": holes})
    doc = run_json(capsys, "fit", sparse, "--law", "chinchilla", *FAST, "--bootstrap", "0")
    assert doc["dropped_rows"] == 4 and doc["n_train"] == len(loss) - 4
    code, out, _ = run(capsys, "fit", sparse, "--law", "chinchilla", *FAST, "--bootstrap", "0")
    assert code == 0 and "4 rows with missing values dropped" in out


# --- fits that say when not to trust them ---------------------------------------------------------------


@pytest.mark.parametrize("law", ["shannon", "chinchilla", "kaplan"])
def test_joint_law_on_one_model_size_is_refused(chinchilla, capsys, law):
    path = chinchilla[0]
    code, out, err = run(capsys, "fit", path, "--law", law, "--where", "N == 1e7", *FAST)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "one model size cannot determine how the loss scales with N" in err and "shannon-run" in err
    # held-out model sizes do not help: the exponent of N is learnt from the training rows
    code, _, err = run(capsys, "fit", path, "--law", law, "--train-where", "N == 3e7", *FAST)
    assert code == 2 and "every training row has N = 3e+07" in err


def test_bits_law_on_one_bit_width_is_refused(chinchilla, capsys, tmp_path):
    path, n, d, loss = chinchilla
    four_bits = write_csv(tmp_path / "bits.csv", {"N": n, "D": d, "bits": np.full(len(n), 4), "loss": loss})
    code, _, err = run(capsys, "fit", four_bits, "--law", "kumar", *FAST)
    assert code == 2 and "every training row has bits = 4" in err


def test_compare_reports_joint_laws_on_one_model_size_as_failed(chinchilla, capsys):
    entries = run_json(capsys, "compare", chinchilla[0], "--where", "N == 1e8", *FAST)
    failed = {e["law"] for e in entries if e["error"] is not None}
    assert failed == {"shannon", "chinchilla", "kaplan"}
    assert all("shannon-run" in e["error"] for e in entries if e["error"] is not None)
    assert entries[0]["law"] in {"power", "shannon-run"}  # the single-run laws fit and rank first


def test_warnings_on_stderr_and_in_json(tmp_path, capsys, monkeypatch):
    d = np.geomspace(100, 1000, 12)
    steep = write_csv(tmp_path / "steep.csv", {"D": d, "loss": 2 + 3 * (100 / d) ** 6})  # beta 6 > bound 3
    code, out, err = run(capsys, "fit", steep, "--law", "power", *FAST, "--bootstrap", "0")
    assert code == 0 and "snrmon: warning: power, run all: beta = 3 ended at its upper bound 3" in err
    assert "snrmon: warning" not in out  # the report on stdout stays clean
    doc = run_json(capsys, "fit", steep, "--law", "power", *FAST, "--bootstrap", "0")
    assert any("beta = 3 ended at its upper bound" in warning for warning in doc["warnings"])

    # A constant at its bound is said once: not again as an interval that excludes it (resampled fits stop
    # at the bound too); the others' intervals are judged as usual.
    def below(problem, log_theta, resamples, seed, bar):
        theta = zip(problem.law.param_names, np.exp(log_theta), strict=True)
        return {name: (0.5 * v, 0.9 * v) for name, v in theta}

    monkeypatch.setattr("snrmon.laws.fitting._bootstrap", below)
    doc = run_json(capsys, "fit", steep, "--law", "power", *FAST, "--bootstrap", "20")
    excluded = [w for w in doc["warnings"] if "excludes its estimate" in w]
    assert excluded and not any("interval of beta" in w for w in excluded)

    four = write_csv(tmp_path / "four.csv", {"D": d[:4], "loss": 2 + 10 / d[:4] ** 0.2})
    doc = run_json(capsys, "fit", four, "--law", "power", *FAST, "--bootstrap", "0")
    assert doc["r2_train"] > 0.999  # a perfect-looking fit ...
    assert any("4 rows for 3 constants (1 degree of freedom)" in w for w in doc["warnings"])  # ... flagged


def test_warning_when_a_bootstrap_interval_excludes_its_estimate(chinchilla, capsys, monkeypatch):
    def beside(problem, log_theta, resamples, seed, bar):  # resampled fits that all settle elsewhere
        theta = np.exp(log_theta)
        return {name: (2 * v, 3 * v) for name, v in zip(problem.law.param_names, theta, strict=True)}

    monkeypatch.setattr("snrmon.laws.fitting._bootstrap", beside)
    doc = run_json(capsys, "fit", chinchilla[0], "--law", "chinchilla", *FAST, "--bootstrap", "20")
    excluded = [w for w in doc["warnings"] if "excludes its estimate" in w]
    assert len(excluded) == len(get_law("chinchilla").params)
    assert excluded[0].startswith("chinchilla: the 95% bootstrap interval of E")

    # An interval that misses its estimate by a rounding only (fits settling at the same optimum) does not.
    def rounding(problem, log_theta, resamples, seed, bar):
        theta = zip(problem.law.param_names, np.exp(log_theta), strict=True)
        return {name: (0.5 * v, v * (1 - 1e-13)) for name, v in theta}

    monkeypatch.setattr("snrmon.laws.fitting._bootstrap", rounding)
    doc = run_json(capsys, "fit", chinchilla[0], "--law", "chinchilla", *FAST, "--bootstrap", "20")
    assert not any("excludes its estimate" in w for w in doc["warnings"])
    # with a handful of resamples the percentile interval is too rough to judge
    doc = run_json(capsys, "fit", chinchilla[0], "--law", "chinchilla", *FAST, "--bootstrap", "5")
    assert not any("excludes its estimate" in w for w in doc["warnings"])


def test_warning_when_a_basin_lies_far_beyond_the_data(tmp_path, capsys):
    law = get_law("shannon")
    theta = np.array([0.02, 0.08, 1.6e-11, 1e-3, 1.0, 0.3, 0.6, 0.2])  # docs/law.md: D* = 1.07e11 at N = 1e7
    n, d, loss = generate("shannon", theta, [1e7, 3e7, 1e8], np.geomspace(1e8, 3e9, 15))
    assert law.d_star(theta, 1e7) > 10 * d.max()
    path = write_csv(tmp_path / "early.csv", {"N": n, "D": d, "loss": loss})
    code, _, err = run(capsys, "fit", path, "--law", "shannon", *FAST, "--bootstrap", "0")
    assert code == 0
    far = [line for line in err.splitlines() if "basin D* more than 10x outside the observed D" in line]
    assert len(far) == 1 and "N = 1e+07 (D* = " in far[0]


# --- large inputs ---------------------------------------------------------------------------------------


def test_continuous_model_sizes_summarise_the_basins(tmp_path, capsys):
    rng = np.random.default_rng(1)
    theta = np.array([0.02, 0.08, 1.6e-11, 1e-3, 1.0, 0.3, 0.6, 0.2])
    columns = {"N": np.exp(rng.uniform(np.log(1e7), np.log(3e9), 400))}
    columns["D"] = np.exp(rng.uniform(np.log(1e8), np.log(1e12), 400))
    loss = get_law("shannon").loss(theta, columns) * np.exp(rng.normal(0.0, NOISE, 400))
    path = write_csv(tmp_path / "continuous.csv", {**columns, "loss": loss})
    picture = tmp_path / "continuous.png"
    code, out, err = run(
        capsys, "fit", path, "--law", "shannon", *FAST, "--bootstrap", "0", "--plot", picture
    )
    assert code == 0, err
    basin = out[out.index("basin D*") :].split("\n\n")[0].splitlines()
    assert "400 distinct N" in basin[1] and len(basin) == 3 + BASIN_GRID  # not one line per N
    assert picture.stat().st_size > 10_000

    doc = run_json(capsys, "fit", path, "--law", "shannon", *FAST, "--bootstrap", "0")
    assert doc["d_star_sampled"] and len(doc["d_star"]) == BASIN_GRID
    sizes = sorted(float(key) for key in doc["d_star"])
    assert sizes[0] <= 1.01 * columns["N"].min() and sizes[-1] >= 0.99 * columns["N"].max()

    entries = {e["law"]: e for e in run_json(capsys, "compare", path, *FAST)}
    for single in ("power", "shannon-run"):  # every row its own run: a clear reason, not a one-row fit
        assert "add a group column" in entries[single]["error"]


def test_progress_bars_on_stderr(chinchilla, capsys, monkeypatch):
    path = chinchilla[0]
    code, _, err = run(capsys, "fit", path, "--law", "chinchilla", *FAST, "--bootstrap", "3", "--progress")
    assert code == 0 and "chinchilla:" in err and "solve" in err  # tqdm: the label and the unit counted
    code, _, err = run(capsys, "fit", path, "--law", "chinchilla", *FAST, "--bootstrap", "0")
    assert code == 0 and err == ""  # stderr is no terminal here: no bar by default
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = run(capsys, "fit", path, "--law", "chinchilla", *FAST, "--bootstrap", "0")
    assert code == 0 and "chinchilla:" in err  # a person at a terminal sees it ...
    code, out, err = run(capsys, "fit", path, "--law", "chinchilla", *FAST, "--bootstrap", "0", "--json")
    assert code == 0 and err == "" and json.loads(out)["law"] == "chinchilla"  # ... a machine does not
    code, _, err = run(capsys, "fit", path, "--law", "chinchilla", *FAST, "--bootstrap", "0", "--no-progress")
    assert code == 0 and err == ""


def test_the_command_runs_blas_on_one_thread(chinchilla, capsys, monkeypatch):
    from threadpoolctl import threadpool_info

    threads = []
    fit_data = fit_verb.fit_data

    def recording(*args, **kwargs):  # BLAS threads as the fit starts
        threads.extend(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")
        return fit_data(*args, **kwargs)

    monkeypatch.setattr(fit_verb, "fit_data", recording)
    code, _, err = run(capsys, "fit", chinchilla[0], "--law", "chinchilla", *FAST, "--bootstrap", "0")
    assert code == 0, err
    assert threads and set(threads) == {1}


# --- compare --------------------------------------------------------------------------------------------


def test_compare_ranks_laws_by_test_r2(chinchilla, capsys):
    path = chinchilla[0]
    entries = run_json(capsys, "compare", path, *FAST, "--train-where", SPLIT)
    assert {e["law"] for e in entries} == {"shannon", "chinchilla", "kaplan", "shannon-run", "power"}
    assert [e["rank"] for e in entries] == list(range(1, len(entries) + 1))
    scores = [e["r2_test"] for e in entries if e["error"] is None]
    assert scores == sorted(scores, reverse=True)
    assert all(e["error"] is None for e in entries[: len(scores)])  # failures rank last
    single = {e["law"]: e for e in entries if e["single_run"]}
    assert single["power"]["n_constants"] == 3 * len(N_VALUES)

    code, out, _ = run(capsys, "compare", path, *FAST, "--where", "N <= 3e7")
    assert code == 0 and "ranked by R² train" in out
    header = next(line for line in out.splitlines() if line.startswith("rank"))
    start, end = header.index("R² train"), header.index("R² test")
    ranked = [line for line in out.splitlines() if line[:1].isdigit()]
    assert {line.split()[1] for line in ranked} == {e["law"] for e in entries}
    r2_train = [float(line[start:end]) for line in ranked]
    assert r2_train == sorted(r2_train, reverse=True)


def test_applicable_laws_follow_the_columns():
    column = np.ones(3)
    names = {law.name for law in applicable_laws(Table({"N": column, "D": column, "loss": column}))}
    assert names == {"shannon", "chinchilla", "kaplan", "shannon-run", "power"}
    with_bits = applicable_laws(Table({"N": column, "D": column, "bits": column, "loss": column}))
    assert {law.name for law in with_bits} == set(LAWS)
    single = applicable_laws(Table({"D": column, "loss": column}))
    assert all(law.single_run for law in single) and len(single) == 2


# --- TensorBoard ----------------------------------------------------------------------------------------

TB_STEPS = list(range(0, 1000, 40))
TOKENS_PER_STEP = 2.0e5


def write_runs(root, runs: dict[str, float | None]) -> None:
    """Lightning-like runs (name/version_0) logging val/loss and train/loss; hparams.yaml gives n_params."""
    from torch.utils.tensorboard import SummaryWriter

    law = get_law("chinchilla")
    for name, n in runs.items():
        directory = root / name / "version_0"
        writer = SummaryWriter(str(directory))
        for step in TB_STEPS:
            d = np.array([max(step, 1) * TOKENS_PER_STEP])
            loss = float(law.loss(CHINCHILLA, {"N": np.array([n or 1e7]), "D": d})[0])
            writer.add_scalar("val/loss", loss, step)
            writer.add_scalar("train/loss", loss * 1.02, step)
        writer.close()
        if n is not None:
            (directory / "hparams.yaml").write_text(f"n_params: {int(n)}\nlr: 0.0003\n")


@pytest.fixture(scope="module")
def tb_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    write_runs(root, {"small": 1e7, "large": 1e8})
    return root


def test_tensorboard_directory_fit(tb_dir, capsys):
    code, out, err = run(
        capsys, "fit", tb_dir, "--tag", "val/loss", "--tokens-per-step", TOKENS_PER_STEP,
        "--law", "chinchilla", *FAST, "--bootstrap", "0", "--json",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["n_train"] == 2 * (len(TB_STEPS) - 1)  # two runs, step 0 skipped
    assert doc["r2_train"] > 0.999  # noiseless data from the law itself
    assert "step 0" in err and "Traceback" not in err

    doc = run_json(capsys, "fit", tb_dir, "--tag", "val/loss", "--law", "power", *FAST, "--bootstrap", "0")
    assert set(doc["params"]) == {"small/version_0", "large/version_0"}  # one run per directory


def test_tensorboard_without_model_sizes_takes_single_run_laws(tmp_path, capsys):
    write_runs(tmp_path, {"a": None, "b": None})
    doc = run_json(capsys, "fit", tmp_path, "--tag", "val/loss", "--law", "power", *FAST, "--bootstrap", "0")
    assert set(doc["params"]) == {"a/version_0", "b/version_0"}
    code, _, err = run(capsys, "fit", tmp_path, "--tag", "val/loss", "--law", "chinchilla")
    assert code == 2 and "--N" in err and "Traceback" not in err
    # --N gives every run the same size: a law of N and D cannot learn its N exponent from one size
    code, _, err = run(capsys, "fit", tmp_path, "--tag", "val/loss", "--N", "1e7", "--law", "kaplan", *FAST)
    assert code == 2 and "one model size" in err and "--law power" in err


# --- forecast --------------------------------------------------------------------------------------------


def test_forecast_mode_max_replays_the_mirrored_curve_alike(tmp_path, capsys):
    val, train = u_curve(0)
    data = write_csv(
        tmp_path / "run.csv", {"step": X, "val_loss": val, "val_score": -val, "train_loss": train}
    )
    documents, texts = {}, {}
    for metric, mode in (("val_loss", "min"), ("val_score", "max")):
        argv = ["forecast", data, "--metric", metric, "--mode", mode, "--train-metric", "train_loss"]
        documents[mode] = run_json(capsys, *argv)
        code, texts[mode], err = run(capsys, *argv)
        assert code == 0, err
    low, high = documents["min"], documents["max"]
    assert low["stop"] is not None and (high["first_warning"], high["stop"]) == (
        low["first_warning"],
        low["stop"],
    )
    same = ("x", "d_star", "d_star_low", "d_star_high", "p_basin", "state", "warning", "stop")
    assert [[p[k] for k in same] for p in high["points"]] == [[p[k] for k in same] for p in low["points"]]
    # The metric's own values: val_score, and its maximum, not the mirrored curve.
    assert [p["loss"] for p in high["points"]] == [-p["loss"] for p in low["points"]]
    assert high["mode"] == "max" and high["maximum"] == {
        "x": low["minimum"]["x"],
        "loss": -low["minimum"]["loss"],
    }
    assert f"observed maximum: {-low['minimum']['loss']:.4g}" in texts["max"]
    # Steps are whole numbers: the x, D* and band columns, and the summary.
    rows = [line.split() for line in texts["max"].splitlines()[1 : len(X) + 1]]
    assert all(row[0].isdigit() for row in rows)
    assert all(row[2].isdigit() for row in rows if row[2] not in ("-", "inf"))
    assert re.search(r"first warning: \d+; stop: \d+; observed maximum: \S+ at step \d+$", texts["max"])


def test_forecast_says_why_it_does_not_forecast(tmp_path, capsys):
    val, _ = u_curve(0)
    # One row: a replay that ran (exit 0) and says why no row has a forecast.
    one = write_csv(tmp_path / "one.csv", {"step": X[:1], "loss": val[:1]})
    code, out, err = run(capsys, "forecast", one)
    assert code == 0 and "no forecast" in out
    assert "snrmon: note: no forecast at the one point: 1 finite point of 10 needed" in err
    assert run_json(capsys, "forecast", one)["points"][0]["note"] == "1 finite point of 10 needed"
    # Fewer than the least: the flag is named, and what bounds it.
    code, _, err = run(capsys, "forecast", one, "--min-points", "5")
    assert code == 2 and "--min-points" in err and "window + 2 = 10" in err and "got 5" in err
    # Some values <= 0 on the loss-only path: skipped by the law, and said.
    shifted = val[:12] - val[3]
    some = write_csv(tmp_path / "some.csv", {"step": X[:12], "loss": shifted})
    code, _, err = run(capsys, "forecast", some)
    assert code == 0 and f"snrmon: warning: {int((shifted <= 0).sum())} of 12 values of loss are <= 0" in err
    # With the training loss: the ratio forecast, which takes any sign; nothing to say.
    code, _, err = run(capsys, "forecast", write_csv(tmp_path / "t.csv", {"step": X[:12], "loss": shifted,
                                                                          "train": 1 / X[:12]}),
                       "--train-metric", "train")  # fmt: skip
    assert code == 0 and "<= 0" not in err


def test_forecast_names_a_repeated_step_and_a_file_of_another_separator(tmp_path, capsys):
    val, _ = u_curve(0)
    steps = np.concatenate([X[:12], X[11:12]])  # a resumed run that logged its last step twice
    twice = write_csv(tmp_path / "twice.csv", {"step": steps, "loss": np.concatenate([val[:12], val[11:12]])})
    code, _, err = run(capsys, "forecast", twice)
    assert code == 2 and f"repeated step values ({X[11]:g})" in err and "--where" not in err
    # Two runs told apart by a column of any name: --where, naming it.
    seeds = {"seed": np.repeat([0.0, 1.0], 12), "step": np.tile(X[:12], 2), "loss": np.tile(val[:12], 2)}
    code, _, err = run(capsys, "forecast", write_csv(tmp_path / "seeds.csv", seeds))
    assert code == 2 and "more than one run (column 'seed'); pick one with --where" in err
    semicolons = tmp_path / "semicolons.csv"
    rows = "".join(f"{x};{v}\n" for x, v in zip(X[:12], val[:12], strict=True))
    semicolons.write_text("step;loss\n" + rows)
    code, _, err = run(capsys, "forecast", semicolons)
    assert code == 2 and "one column, 'step;loss': separate the columns with commas" in err


def test_a_logged_metric_is_replayed_at_the_steps_its_checks_read_it():
    from snrmon.logs import Table

    def checks(steps, values):
        return Table({"step": np.array(steps, dtype=float), "loss": np.array(values, dtype=float)})

    # Lightning: a validation logged at the global step − 1, read by the check after it at the global step; a
    # value no check read (logged after the last) keeps its step.
    steps, values = np.array([3.0, 7.0, 11.0, 30.0]), np.array([2.0, 1.5, 1.25, 1.0])
    read = checks([4, 8, 12], [2.0, 1.5, 1.25])
    assert forecast_verb.on_check_steps(steps, values, read).tolist() == [4, 8, 12, 30]
    # Periodic checks every 3 steps: the check at step 12 runs before that step's validation (logged at 11),
    # so it reads the value logged at 7 again (no new point, not logged), and the check at 15 reads 11's.
    read = checks([6, 9, 15], [2.0, 1.5, 1.25])
    assert forecast_verb.on_check_steps(steps, values, read).tolist() == [6, 9, 15, 30]
    # The same value twice in a row (a plateau): each check takes the latest value before it not yet read.
    flat = np.array([2.0, 2.0, 2.0])
    read = checks([2, 3, 4], [2.0, 2.0, 2.0])
    assert forecast_verb.on_check_steps(np.array([1.0, 2.0, 3.0]), flat, read).tolist() == [2, 3, 4]


def test_forecast_reads_a_csv_column_named_by_tag_as_by_metric(capsys):
    data = REPO / "data" / "overfit_mlp_run.csv"
    by_metric = run_json(capsys, "forecast", data, "--metric", "val_loss", "--train-metric", "train_loss")
    by_tag = run_json(capsys, "forecast", data, "--tag", "val_loss", "--train-metric", "train_loss")
    assert by_tag == by_metric and by_tag["metric"] == "val_loss"


def test_forecast_plot_problems_fail_before_the_replay(tmp_path, capsys, monkeypatch):
    def no_replay(args):
        raise forecast_verb.LogError("the replay ran")  # a --plot problem must be reported before this

    monkeypatch.setattr(forecast_verb, "load_curve", no_replay)
    data = REPO / "data" / "overfit_mlp_run.csv"
    problems = {
        tmp_path / "no" / "x.png": "cannot write",
        tmp_path / "x.xyz": "matplotlib writes no 'xyz' files",
        tmp_path / "taken": "cannot write",  # (savefig would write taken.png: a directory)
    }
    (tmp_path / "taken.png").mkdir()
    for picture, message in problems.items():
        code, out, err = run(capsys, "forecast", data, "--plot", picture)
        assert code == 2 and err.count("\n") == 1 and message in err and out == "", err
    picture = tmp_path / "replay.svg"  # any format matplotlib writes, told from the extension
    code, _, err = run(capsys, "forecast", data, "--plot", picture)
    assert code == 2 and "the replay ran" in err and not picture.exists()


def test_a_run_picked_from_a_directory_of_runs_replays_as_its_own_directory(tmp_path, capsys):
    """Two TensorBoard runs with very different training losses under one directory (and a third, short,
    that no BasinEarlyStopping watched): a run picked with --where replays exactly as its own directory, with
    --train-metric and with the training-loss mean BasinEarlyStopping logged."""
    from torch.utils.tensorboard import SummaryWriter

    overfitting, improving = u_curve(0), improving_curve(1, sigma=0.001)
    runs = {
        "a": (*overfitting, True),
        "b": (improving[0], 100 * improving[1], True),
        "c": (overfitting[0][:12], overfitting[1][:12], False),  # short: the law of the loss alone is slow
    }
    for name, (val, train, watched) in runs.items():
        writer = SummaryWriter(str(tmp_path / name))
        for step, v, t in zip(X.astype(int).tolist(), val, train, strict=False):
            writer.add_scalar("train_loss", t, step)
            writer.add_scalar("val_loss", v, step)
            if watched:
                writer.add_scalar("snr/forecast/val_loss/train_loss", t, step)
        writer.close()
    replays = {}  # (run, with --train-metric): (its own directory, picked from the parent)
    for name, train in (("a", True), ("a", False), ("c", False)):
        argv = ["--metric", "val_loss", *(["--train-metric", "train_loss"] if train else []), "--json"]
        replays[name, train] = [
            run(capsys, "forecast", path, *argv, *where)
            for path, where in ((tmp_path / name, []), (tmp_path, ["--where", f'group == "{name}"']))
        ]
    for (name, train), (alone, picked) in replays.items():
        assert alone[0] == 0 and picked == alone, (name, train, alone[2], picked[2])
    document = {key: json.loads(alone[1]) for key, (alone, _) in replays.items()}
    # Run a overfits: a stop, from its own training loss (with run b's, ~100 times larger, it would differ).
    assert document["a", True]["stop"] is not None
    # Its logged mean is its training loss at the same steps: the same replay, and said.
    assert document["a", False] == document["a", True]
    assert "snr/forecast/val_loss/train_loss" in replays["a", False][1][2]
    # Run c, never watched: the law of the metric alone, as read alone.
    methods = {point["method"] for point in document["c", False]["points"]}
    assert "snr/forecast" not in replays["c", False][1][2] and methods == {None, "law"}


# --- the logs people have: Lightning's metrics.csv, Hugging Face's trainer_state.json ---------------------


@pytest.fixture(scope="module")
def lightning_logs(tmp_path_factory):
    """A real (CPU, seconds) Lightning fit watched by BasinEarlyStopping, logged by a CSVLogger and a
    TensorBoardLogger side by side: the same training in both logs. The training loss is logged every step,
    the validation loss once an epoch (two steps): on different rows of metrics.csv."""
    import warnings

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from test_basin_early_stopping import _data, _fit

    from snrmon.callbacks import BasinEarlyStopping

    root = tmp_path_factory.mktemp("lightning")
    callback = BasinEarlyStopping(monitor="val_loss")
    loggers = [CSVLogger(root, name="run", version=0), TensorBoardLogger(root, name="tb", version=0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the basin warnings, Lightning's hints about workers
        _fit(callback, _data(64, 0), 60, logger=loggers, log_every_n_steps=1)
    assert callback.stopped_step > 0  # a run with decisions to compare
    return root / "run" / "version_0" / "metrics.csv", root / "tb" / "version_0", callback


def test_forecast_of_a_lightning_csv_equals_its_tensorboard_run(lightning_logs, capsys):
    csv, tensorboard, callback = lightning_logs
    header = csv.read_text().splitlines()[0].split(",")
    assert {"step", "epoch", "train_loss", "val_loss"} <= set(header)  # what CSVLogger wrote
    # The training-loss mean BasinEarlyStopping logged with its forecasts: the live run's points, from either.
    live = {log: run_json(capsys, "forecast", log, "--metric", "val_loss") for log in (csv, tensorboard)}
    assert live[csv] == live[tensorboard]
    assert live[csv]["stop"] == callback.stopped_step
    assert [p["x"] for p in live[csv]["points"]] == [f.x for f in callback.forecaster.history]
    # The logged training loss, averaged over each interval between validations: like for like.
    argv = ("--metric", "val_loss", "--train-metric", "train_loss")
    replay = {log: run_json(capsys, "forecast", log, *argv) for log in (csv, tensorboard)}
    assert replay[csv] == replay[tensorboard]
    assert replay[csv]["first_warning"] is not None and replay[csv]["stop"] is not None
    assert len(replay[csv]["points"]) == len(callback.forecaster.history)  # one point per validation
    # --tag names the scalar as well as --metric; without either the tags to choose from are named.
    assert (
        run_json(capsys, "forecast", csv, "--tag", "val_loss", "--train-metric", "train_loss") == replay[csv]
    )
    code, _, err = run(capsys, "forecast", csv)
    assert code == 2 and "choose the loss scalar with --tag; likely loss tags:" in err
    assert err.index("val_loss,") < err.index("d_star")  # the losses first, not the forecast's terms
    # snrmon fit reads the same points from either log.
    fit = ("--tag", "val_loss", "--law", "power", *FAST, "--bootstrap", "0")
    assert run_json(capsys, "fit", csv, *fit) == run_json(capsys, "fit", tensorboard, *fit)
    code, _, err = run(capsys, "fit", csv, "--law", "power")
    assert code == 2 and "--tag" in err and "val_loss" in err


def write_trainer_state(path: Path, val: np.ndarray, train_steps: np.ndarray, train: np.ndarray) -> Path:
    """A trainer_state.json as Hugging Face's Trainer writes it: training entries (loss, learning_rate,
    grad_norm), evaluation entries (eval_loss, eval_runtime) at X, and the closing summary."""
    history = [
        {"epoch": step / 400, "grad_norm": 1.5, "learning_rate": 1e-4, "loss": loss, "step": int(step)}
        for step, loss in zip(train_steps, train, strict=True)
    ]
    history += [
        {"epoch": step / 400, "eval_loss": loss, "eval_runtime": 0.8, "step": int(step)}
        for step, loss in zip(X, val, strict=True)
    ]
    history.sort(key=lambda entry: (entry["step"], "eval_loss" in entry))  # as logged: training first
    history.append({"epoch": 5.0, "step": int(X[-1]), "total_flos": 1e12, "train_loss": 0.9})
    state = {"best_metric": None, "global_step": int(X[-1]), "log_history": history, "max_steps": 2000}
    path.write_text(json.dumps(state, indent=2))
    return path


def test_forecast_of_a_hugging_face_trainer_state(tmp_path, capsys):
    val, _ = u_curve(0)
    # The training loss logged every 5 steps, 5 values between two evaluations (every 25 steps).
    train_steps = np.arange(5, X[-1] + 1, 5)
    train = 0.1 + 3.0 * train_steps**-0.6 + 0.001 * np.random.default_rng(1).normal(size=len(train_steps))
    state = write_trainer_state(tmp_path / "trainer_state.json", val, train_steps, train)
    # Expected: a point per evaluation, with the mean of the 5 training losses logged since the previous one.
    means = train.reshape(len(X), 5).mean(axis=1)
    dense = write_csv(tmp_path / "expected.csv", {"step": X, "eval_loss": val, "train": means})
    expected = run_json(capsys, "forecast", dense, "--metric", "eval_loss", "--train-metric", "train")
    document = run_json(capsys, "forecast", state, "--metric", "eval_loss", "--train-metric", "loss")
    assert [p["x"] for p in document["points"]] == X.tolist()
    assert [p["loss"] for p in document["points"]] == val.tolist()
    assert document == expected and document["stop"] is not None
    # Hugging Face's loss is the training loss: no default guesses which to monitor.
    code, _, err = run(capsys, "forecast", state)
    assert code == 2 and "likely loss tags: eval_loss, loss, train_loss" in err
    # The same file, any name: told from its content. snrmon fit reads it too.
    renamed = tmp_path / "state.txt"
    renamed.write_text(state.read_text())
    assert (
        run_json(capsys, "forecast", renamed, "--metric", "eval_loss", "--train-metric", "loss") == document
    )
    doc = run_json(capsys, "fit", state, "--tag", "eval_loss", "--law", "power", *FAST, "--bootstrap", "0")
    assert doc["n_train"] == len(X)


def test_a_training_loss_missing_where_it_is_needed_is_said(tmp_path, capsys):
    val, train = u_curve(0, sigma=0.01)  # (noisy enough for quick law fits where the training loss lacks)
    # Two runs in one file, Lightning-like rows (training and validation metrics on different rows): picking
    # one with --where leaves rows of val_loss that hold no train_loss. An error, not a loss-only forecast.
    rows = ["run,step,train_loss,val_loss"]
    for name in ("a", "b"):
        for step, v, t in zip(X, val, train, strict=True):
            rows += [f"{name},{step},{t},", f"{name},{step},,{v}"]
    both = tmp_path / "both.csv"
    both.write_text("\n".join(rows) + "\n")
    argv = ["forecast", both, "--metric", "val_loss", "--train-metric", "train_loss"]
    code, _, err = run(capsys, *argv, "--where", 'run == "a" and val_loss > 0')
    assert code == 2 and "no finite train_loss on the rows of val_loss" in err and "--train-metric" in err
    # A metrics.csv whose training loss was logged at every other validation only: those points are fed
    # without it (the law of the loss alone there), and the command says how many.
    rows = ["epoch,step,train_loss,val_loss"]
    for i, (step, v, t) in enumerate(zip(X, val, train, strict=True)):
        rows += [f"{i},{step},{t if i % 2 else ''},", f"{i},{step},,{v}"]
    sparse = tmp_path / "metrics.csv"
    sparse.write_text("\n".join(rows) + "\n")
    code, _, err = run(capsys, "forecast", sparse, "--metric", "val_loss", "--train-metric", "train_loss")
    half = f"{len(X) // 2} of {len(X)} points of val_loss have no finite train_loss logged in the interval"
    assert code == 0 and f"snrmon: warning: {half}" in err
    # A logged value without its step cannot be placed.
    sparse.write_text("\n".join(rows[:5] + ["3,,1.0,"] + rows[5:]) + "\n")
    code, _, err = run(capsys, "forecast", sparse, "--metric", "val_loss")
    assert code == 2 and "no step on row 5" in err


# --- bad input: one line on stderr, exit status 2 -------------------------------------------------------


def bad_inputs(tmp: Path, chinchilla_path: Path, tb: Path) -> list[tuple[list, str]]:
    def csv(name, text):
        path = tmp / name
        path.write_text(text)
        return path

    base = chinchilla_path.read_text().splitlines()
    nonpositive = [base[0]] + base[1:4] + [
        "m,1e7,0,3.0",
        "m,1e7,-5,3.0",
        "m,1e7,1e9,-1.0",
    ] + base[4:30]  # fmt: skip
    return [
        (["fit", tmp / "absent.csv", "--law", "chinchilla"], "no such file or directory"),
        (["fit", csv("nod.csv", "N,tokens,loss\n1,2,3\n"), "--law", "chinchilla"], "missing column D"),
        (["fit", csv("none.csv", "x,loss\n1,2\n"), "--law", "shannon"], "missing columns N, D"),
        (
            ["fit", csv("text.csv", "N,D,loss\n1,1,2\nabc,1,2\n"), "--law", "kaplan"],
            "'abc' in row 2 after",
        ),  # not np.str_('abc')
        (
            [
                "fit",
                csv(
                    "huge.csv", "N,D,loss\n" + "".join(f"{n},{d},1e308\n" for n in (1, 2) for d in (1, 2, 3))
                ),
                "--law",
                "kaplan",
            ],
            "values too large to fit",
        ),  # fmt: skip
        (
            ["forecast", csv("texty.csv", "step,loss\n1,2.0\n2,oops\n")],
            "holds text, not numbers: 'oops' in row 2",
        ),
        (
            ["forecast", chinchilla_path, "--x", "D", "--where", "D > 1e20"],
            "--where 'D > 1e20' keeps no rows",
        ),
        (["forecast", csv("negative.csv", "step,loss\n1,-2.0\n2,-2.5\n")], "every value of loss is <= 0"),
        (
            ["forecast", csv("acc.csv", "step,acc\n1,0.5\n2,0.6\n"), "--metric", "acc", "--mode", "max"],
            "every value of -acc (--mode max) is <= 0; the loss-only forecast fits the Shannon law",
        ),
        (["forecast", chinchilla_path, "--mode", "maximum"], "invalid choice: 'maximum'"),
        (
            ["forecast", csv("blank.csv", "step,loss,train\n1,,2.0\n2,,1.5\n3,,1.2\n")],
            "nothing to forecast in",
        ),  # fmt: skip
        (
            ["forecast", tmp / "blank.csv", "--train-metric", "train"],
            "loss has no finite value at any of the 3 points",
        ),  # the training loss, which the ratio forecast takes, cannot stand in for the metric
        (["forecast", chinchilla_path, "--x", "D", "--plot", tmp / "x.xyz"], "matplotlib writes no 'xyz'"),
        (["fit", csv("neg.csv", "\n".join(nonpositive)), "--law", "chinchilla"], "3 rows with non-positive"),
        (
            ["fit", csv("few.csv", "N,D,loss\n1e7,1e9,3\n1e8,1e9,2.5\n1e7,2e9,2.9\n"), "--law", "shannon"],
            "3 rows cannot determine 8 constants",
        ),  # fmt: skip
        (["fit", chinchilla_path, "--law", "chinchilla", "--train-where", "D > 0"], "no rows left to test"),
        (["fit", chinchilla_path, "--law", "chinchilla", "--train-where", "D < 0"], "matches no rows"),
        (["fit", chinchilla_path, "--law", "chinchilla", "--train-where", "__import__('os')"], "not allowed"),
        (["fit", chinchilla_path, "--law", "chinchilla", "--train-where", "D <"], "invalid expression"),
        (["fit", chinchilla_path, "--law", "chinchilla", "--where", "loss > 1e9"], "keeps no rows"),
        (["fit", chinchilla_path, "--law", "chinchilla", "--where", "size > 1"], "unknown column 'size'"),
        (["fit", tb, "--tag", "val/acc", "--law", "power"], "likely loss tags: val/loss, train/loss"),
        (
            ["fit", tb, "--law", "power"],
            "choose the loss scalar with --tag; likely loss tags: val/loss, train/loss",
        ),
        (["fit", chinchilla_path, "--law", "gpt"], "invalid choice: 'gpt'"),
        (["fit", chinchilla_path, "--law", "chinchilla", "--bootstrap", "-1"], "must be 0 or more"),
        (["fit", chinchilla_path, "--law", "chinchilla", "--seed", "-1"], "--seed: must be 0 or more"),
        (
            ["fit", chinchilla_path, "--law", "chinchilla", "--where", "not " * 5000 + "D > 1"],
            "nested too deeply",
        ),
        (["fit", chinchilla_path, "--law", "power", "--train-where", "N <= 1e8"], "no training rows"),
        (
            ["fit", chinchilla_path, "--law", "chinchilla", "--plot", tmp / "no" / "dir" / "x.png"],
            "cannot write",
        ),
        ([], "required"),
    ]


def test_bad_input_gives_one_line_and_exit_2(chinchilla, tb_dir, tmp_path, capsys):
    for argv, message in bad_inputs(tmp_path, chinchilla[0], tb_dir):
        code, out, err = run(capsys, *argv, *(FAST if argv and argv[0] in ("fit", "compare") else []))
        assert code == 2, (argv, err)
        assert err.startswith("snrmon: error: ") and err.count("\n") == 1, (argv, err)
        assert err.count("snrmon:") == 1, (argv, err)  # no "snrmon: error: snrmon: ..."
        assert message in err, (argv, err)
        assert "Traceback" not in err and out == ""


def test_help_exits_zero(capsys):
    code, out, _ = run(capsys, "fit", "--help")
    assert code == 0 and "--train-where" in out and "tokens-per-step" in out


# --- the installed script and the real data -------------------------------------------------------------


def test_installed_console_script(chinchilla):
    script = Path(sys.executable).parent / "snrmon"
    if not script.exists():
        pytest.skip("the snrmon script is not installed (pip install -e .)")
    done = subprocess.run(
        [script, "fit", chinchilla[0], "--law", "kaplan", *FAST, "--bootstrap", "0", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["law"] == "kaplan"
    bad = subprocess.run([script, "fit", "absent.csv", "--law", "kaplan"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "no such file" in bad.stderr
    seed = [script, "fit", chinchilla[0], "--law", "kaplan", "--seed", "-1"]
    bad = subprocess.run(seed, capture_output=True, text=True)
    assert bad.returncode == 2 and "must be 0 or more" in bad.stderr and "internal error" not in bad.stderr


@pytest.mark.skipif(not PYTHIA.exists(), reason="data/pythia_deduped_lambada_loss.csv not in the repository")
def test_pythia_shannon_fit_finds_the_small_model_basin(capsys):
    """The README of the data: the smallest models' losses turn back up late in training (a real basin)."""
    from snrmon.logs import read_csv

    table = read_csv(PYTHIA)
    kept = table["D"] >= 6.3e9  # the README: earlier checkpoints are chaotic
    train = kept & (table["N"] <= 7e9) & (table["D"] <= 1.8e11)
    doc = run_json(
        capsys, "fit", PYTHIA, "--law", "shannon", "--where", "D >= 6.3e9", "--train-where",
        "N <= 7e9 and D <= 1.8e11", "--bootstrap", "0",
    )  # fmt: skip
    assert doc["n_train"] == int(train.sum()) and doc["n_test"] == int((kept & ~train).sum())
    smallest = str(int(table["N"].min()))
    d_range = table["D"][kept]
    assert doc["d_star"][smallest] is not None
    assert d_range.min() < doc["d_star"][smallest] < d_range.max()
    assert doc["r2_test"] > 0.5  # extrapolates to the held-out largest model and latest checkpoints


def test_fit_explains_a_missing_basin_that_the_forecast_may_show(tmp_path, capsys):
    """`snrmon fit` fits the single-run law to the whole curve; where it finds no basin it says that
    `snrmon forecast` reads the recent trend and may forecast one (the two can disagree on the same logs)."""
    x = np.arange(1, 41) * 25.0
    # (a little noise, as real curves have: on a noise-free curve the law's search takes minutes)
    loss = (0.5 + 2.0 * x**-0.5) * (1 + 0.002 * np.random.default_rng(0).standard_normal(len(x)))
    data = write_csv(tmp_path / "falling.csv", {"D": x, "loss": loss})
    assert main(["fit", str(data), "--law", "shannon-run", "--bootstrap", "0"]) == 0  # (no intervals)
    out = capsys.readouterr().out
    assert "all  none" in out and "`snrmon forecast` on the same" in out


def test_fit_reads_no_basin_from_a_flat_loss(tmp_path, capsys):
    """A loss the same at every row: every D minimises it, so the law's basin (which it places anywhere on
    such a curve) is none, and a warning says why."""
    flat = write_csv(tmp_path / "flat.csv", {"D": np.arange(1, 41) * 25.0, "loss": np.full(40, 2.0)})
    assert main(["fit", str(flat), "--law", "shannon-run", "--bootstrap", "0", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["d_star"] == {"all": None}
    assert "is the same at every row: no basin (D* none)" in captured.err


def test_the_docs_replay_example_is_what_the_command_prints(capsys):
    # docs/forecast.md replays data/overfit_mlp_run.csv and quotes the first warning, the stop and the
    # messages: the command must print what the doc says (the doc went stale once).
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "forecast.md").read_text()
    data = root / "data" / "overfit_mlp_run.csv"
    assert f"snrmon forecast data/{data.name} --metric val_loss --train-metric train_loss" in doc
    replay = run_json(capsys, "forecast", data, "--metric", "val_loss", "--train-metric", "train_loss")
    quoted = re.search(r'"first_warning": ([\d.]+), "stop": ([\d.]+), "minimum": \{"x": ([\d.]+)', doc)
    assert quoted is not None
    printed = [replay["first_warning"], replay["stop"], replay["minimum"]["x"]]
    assert printed == [float(value) for value in quoted.groups()]
    warning = next(point for point in replay["points"] if point["warning"])
    steps_away = round(warning["d_star"] - warning["x"])
    assert f"basin ahead at step {round(warning['d_star'])} " in doc
    assert f"{steps_away} steps from step {round(warning['x'])}" in doc


def test_forecast_reads_a_dataset_snr_column_and_thins_it_one_measurement_per_point(tmp_path, capsys):
    from test_forecast import plateau_with_noisy_gap

    x, val, train = plateau_with_noisy_gap()
    columns = {"step": x, "loss": val, "train": train}
    alone = run_json(capsys, "forecast", write_csv(tmp_path / "a.csv", columns), "--train-metric", "train")
    # At most 1 throughout: the evidence of memorisation, said in a note; the forecaster's own decisions.
    low = write_csv(tmp_path / "low.csv", {**columns, "dataset_snr": [0.5] * len(x)})
    code, out, err = run(capsys, "forecast", low, "--train-metric", "train", "--json")
    assert code == 0 and "dataset_snr is read as the training set's SNR" in err
    assert json.loads(out)["first_warning"] is not None and alone["first_warning"] is None
    # One measurement in each pair of points, --every 2: one value per kept point, never the same one twice
    # (one value at most 1 is no evidence).
    once = ["nan"] * len(x)
    once[3] = 0.5
    code, out, _ = run(capsys, "forecast", write_csv(tmp_path / "once.csv", {**columns, "dataset_snr": once}),
                       "--train-metric", "train", "--every", "2", "--json")  # fmt: skip
    plain = run_json(capsys, "forecast", tmp_path / "a.csv", "--train-metric", "train", "--every", "2")
    assert code == 0 and json.loads(out)["points"] == plain["points"]
    # Text in it: said, not guessed.
    text = write_csv(tmp_path / "text.csv", {**columns, "dataset_snr": ["low"] * len(x)})
    code, _, err = run(capsys, "forecast", text, "--train-metric", "train")
    assert code == 2 and "'dataset_snr'" in err and "holds text" in err


def test_forecast_replays_a_check_whose_metric_was_not_finite(tmp_path, capsys):
    """A BasinEarlyStopping check whose metric was NaN logged no value (finite values only) but fed its
    training loss and training-set SNR: the replay keeps that point, as the live run did."""
    from test_forecast import plateau_with_noisy_gap
    from torch.utils.tensorboard import SummaryWriter

    from snrmon.forecast import BasinForecaster

    x, val, train = plateau_with_noisy_gap()
    val = val.copy()
    val[12] = math.nan
    snr = [2.0] * 12 + [0.5, 0.5] + [2.0] * (len(x) - 14)  # the first of two at most 1 at the NaN check
    writer = SummaryWriter(str(tmp_path / "run"))
    for step, value, mean, ratio in zip(x, val, train, snr, strict=True):
        writer.add_scalar("val_loss", value, int(step) - 1)  # (Lightning logs a validation one step early)
        if math.isfinite(value):
            writer.add_scalar("snr/forecast/val_loss/value", value, int(step))
        writer.add_scalar("snr/forecast/val_loss/train_loss", mean, int(step))
        writer.add_scalar("snr/forecast/val_loss/dataset_snr", ratio, int(step))
    writer.close()
    live = BasinForecaster()
    live.replay(x, val, train, snr)
    document = run_json(capsys, "forecast", tmp_path / "run", "--tag", "val_loss")
    assert [p["x"] for p in document["points"]] == [f.x for f in live.history]
    assert document["first_warning"] == next((f.x for f in live.history if f.warning), None)


def test_the_forecast_series_of_lightning_and_hugging_face_runs_in_one_folder_are_both_found(tmp_path):
    """A Lightning run logs snr/forecast/<tag>/..., a Hugging Face run's TensorBoard callback
    train/snr/forecast/eval_<x>/... for its eval/<x>: a folder holding both gives each run its own."""
    from torch.utils.tensorboard import SummaryWriter

    for run, series in (
        ("lightning", "snr/forecast/eval/loss/value"),
        ("hf", "train/snr/forecast/eval_loss/value"),
    ):
        with SummaryWriter(str(tmp_path / run)) as writer:
            for step in (10, 20, 30):
                writer.add_scalar("eval/loss", 1.0 / step, step)
                writer.add_scalar(series, 1.0 / step, step + 1)
    found = forecast_verb.read_forecast_series(str(tmp_path), "eval/loss", "value")
    assert sorted(found) == ["hf", "lightning"]
    assert all(list(table["step"]) == [11, 21, 31] for table in found.values())

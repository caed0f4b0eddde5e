"""BasinWatch: what a basin early-stopping callback does at each check, without a framework.

The Lightning ``BasinEarlyStopping`` and the Hugging Face ``BasinEarlyStoppingCallback`` both drive it: it
holds the :class:`~snrmon.forecast.BasinForecaster` with the callbacks' defaults, feeds it the monitored
metric (mirrored for ``mode="max"``) with the mean training loss since the previous check (and the training
set's SNR where a monitor measures it), and words what a
forecast means for the user: the values to log, the warning when the state changes, the reason to stop, and
the notes said once. The callbacks add only their framework's seams: where the metric and the training loss
come from, how ranks agree, where messages and values go, and how the state is saved.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from snrmon.forecast.display import LAW_NEEDS_POSITIVE, as_metric, format_step, mode_sign
from snrmon.forecast.forecaster import CONFIDENCE, HORIZON, MIN_POINTS, BasinForecaster
from snrmon.forecast.result import Forecast

#: The forecast's values logged at each check, as ``snr/forecast/<monitor>/<name>``.
LOGGED = ("d_star", "d_star_low", "d_star_high", "steps_to_basin", "p_basin")


class BasinWatch:
    """Forecasts the basin of one monitored metric, check by check, and says what each forecast means.

    Args:
        monitor: the metric's name, as messages and logged keys quote it.
        mode: ``"min"``: lower is better (a loss); ``"max"``: higher is better, fed to the forecaster
            mirrored.
        horizon, confidence, min_points, prior, n_params: as for :class:`~snrmon.forecast.BasinForecaster`.
        tokens_per_step: tokens per optimizer step, the unit of a prior's D (the forecaster's
            ``tokens_per_x``; x is the optimizer step).

    Raises:
        ValueError: an empty or non-string ``monitor``, an invalid ``mode``, or forecaster argument.
    """

    def __init__(
        self,
        monitor: str,
        mode: str = "min",
        horizon: float = HORIZON,
        confidence: float = CONFIDENCE,
        min_points: int = MIN_POINTS,
        prior: dict | str | None = None,
        n_params: float | None = None,
        tokens_per_step: float = 1.0,
    ) -> None:
        if not (isinstance(monitor, str) and monitor):
            raise ValueError(f"monitor must name a logged metric (a non-empty string), got {monitor!r}")
        real = isinstance(tokens_per_step, numbers.Real) and not isinstance(tokens_per_step, bool)
        if not (real and math.isfinite(tokens_per_step) and tokens_per_step > 0):
            raise ValueError(f"tokens_per_step must be a positive number, got {tokens_per_step!r}")
        self.monitor, self.mode = monitor, mode
        # The forecaster wants a curve that falls to its basin and turns up: a higher-is-better metric is fed
        # negated (its peak becomes the basin). The training loss is fed as it is, not negated: the ratio
        # forecast regresses the monitored curve on the training loss, r = d(monitored) / d(train loss), and
        # while the model generalises -accuracy falls as the training loss falls, so r is positive and
        # crosses zero at the accuracy's peak, exactly as for a validation loss. Negating the training loss
        # too would flip r's sign and make the training loss rise, which the ratio forecast rejects.
        self.sign = mode_sign(mode)
        self._settings = {
            "horizon": horizon,
            "confidence": confidence,
            "min_points": min_points,
            "prior": prior,
            "n_params": n_params,
            "tokens_per_x": tokens_per_step,
        }
        self.forecaster = BasinForecaster(**self._settings)
        self.announced = "no forecast"  # the last state announced, so a warning repeats only when it changes
        self.said_departure = False  # a prior that does not fit this run is said once
        self.said_nonpositive = False  # a loss-only forecast given values <= 0 is said once
        self.said_nonfinite = False  # a metric that is NaN or infinite at a check is said once
        self.fed_dataset_snr: float | None = None  # the training set's SNR fed at the last check (logged)

    def reset(self) -> None:
        """Forget the curve and what was said: a new run starts (a callback serving another fit)."""
        self.forecaster = BasinForecaster(**self._settings)
        self.announced = "no forecast"
        self.said_departure = self.said_nonpositive = self.said_nonfinite = False
        self.fed_dataset_snr = None

    # -- a check -----------------------------------------------------------------------------------------

    def is_new_step(self, step: float) -> bool:
        """Whether a point at ``step`` would follow the points so far (two checks at one step add one)."""
        points = self.forecaster.points.x
        return step > 0 and (not points or step > points[-1])

    def update(
        self, step: float, value: float, train_loss: float | None, dataset_snr: float | None = None
    ) -> Forecast:
        """Add the metric's ``value`` at optimizer step ``step`` (and the mean training loss since the last
        check, ``None`` if there is none; the training set's SNR N|G|²/tr Σ measured since the last check,
        ``None`` if none) and forecast. The forecast is of the mirrored curve: pass it on to
        :meth:`describe` and the others, which mirror it back."""
        self.fed_dataset_snr = dataset_snr
        return self.forecaster.update(step, self.sign * value, train_loss, dataset_snr)

    def metrics(self, forecast: Forecast) -> dict[str, float]:
        """The finite values to log: ``snr/forecast/<monitor>/<name>`` for :data:`LOGGED`, and the
        metric's value, training-loss mean (and training set's SNR) this forecast was fed, so that a replay
        of the logs (``snrmon forecast RUN --tag MONITOR``) reads exactly what the live run saw, and the
        number of points the forecaster holds."""
        prefix = f"snr/forecast/{self.monitor}"
        values = {f"{prefix}/{name}": getattr(forecast, name) for name in LOGGED}
        values[f"{prefix}/value"] = self.sign * self.forecaster.points.loss[-1]  # the metric as read
        values[f"{prefix}/train_loss"] = self.forecaster.points.train[-1]
        values[f"{prefix}/dataset_snr"] = self.fed_dataset_snr
        # How many points the forecaster holds: a replay of logs that begin mid-run (a fit resumed from a
        # checkpoint logs to a new version) sees that it lacks the earlier ones.
        values[f"{prefix}/points"] = len(self.forecaster.points.x)
        return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}

    def announcement(self, forecast: Forecast) -> str | None:
        """The warning to give when the forecast's state changes to a warning or a stop, and the withdrawal
        of a warning when it changes back to improving (None otherwise)."""
        state = forecast.state if forecast.warning or forecast.stop else "improving"
        if state == self.announced or forecast.d_star is None:
            return None
        warned, self.announced = self.announced != "no forecast", state
        if state == "improving":
            if not warned:
                return None
            why = forecast.note.removeprefix("no warning yet: ").removeprefix("no warning: ")
            why = f" ({why})" if why else ""
            at = format_step(forecast.x)
            return f"{self.monitor}: warning withdrawn at step {at}: improving again{why}"
        return f"{self.monitor}: {self.describe(forecast)}{_evidence(forecast)}"

    def stop_reason(self, forecast: Forecast) -> str:
        """Why a forecast that stops does so, in a sentence."""
        return (
            f"{self.monitor}: {self.describe(forecast)} (probability {forecast.p_basin:.2f} that it lies "
            f"within {self.forecaster.horizon:.0%} more training or has been entered){_evidence(forecast)}"
        )

    def nonfinite_note(self, value: float, step: int) -> str | None:
        """Once: the metric is NaN or infinite at a check, which adds no point (a run whose metric is never
        finite would otherwise never forecast, without a word)."""
        if self.said_nonfinite or math.isfinite(value):
            return None
        self.said_nonfinite = True
        return (
            f"{self.monitor} is {value} at step {step}: no point of the forecast (said once; every check "
            "with a value that is not finite is skipped)"
        )

    def departure_note(self, forecast: Forecast) -> str | None:
        """Once: the note that this run departs from the prior (its forecasts may not fit)."""
        if forecast.method != "prior" or not self.forecaster.prior_departs or self.said_departure:
            return None
        self.said_departure = True
        return f"{self.monitor}: {forecast.note}"

    def nonpositive_note(self, value: float, step: int, how_to_give_the_training_loss: str) -> str | None:
        """Once: why a loss-only forecast (no training loss in the window) forecasts nothing from values
        <= 0; ``how_to_give_the_training_loss`` names the adapter's remedy."""
        mirrored = self.sign * value
        if self.said_nonpositive or not (math.isfinite(mirrored) and mirrored <= 0):
            return None
        train = self.forecaster.points.train[-self.forecaster.window :]
        if all(math.isfinite(t) for t in train):
            return None  # the ratio forecast, which takes any sign
        self.said_nonpositive = True
        mirror = f" (mode='max' forecasts -{self.monitor} = {mirrored:.4g})" if self.sign < 0 else ""
        return (
            f"{self.monitor} is {value:.4g} at step {step}{mirror}, and {how_to_give_the_training_loss}: "
            f"{LAW_NEEDS_POSITIVE}"
        )

    def describe(self, forecast: Forecast) -> str:
        """One sentence naming the basin in whole steps and the metric's own values, e.g. 'basin ahead at
        step 1234 (band 1100 to 1502), val_loss there ≈ 0.7535, 111 steps from step 1123'."""
        forecast = as_metric(forecast, self.sign)
        step = format_step
        if forecast.d_star is None:
            return f"no forecast yet ({forecast.note})"
        if forecast.d_star == math.inf:
            return f"no basin in sight at step {step(forecast.x)} ({self.monitor} {forecast.loss:.4g})"
        if forecast.d_star_low is None:  # the prior alone, before the run's points could refit it
            return f"the prior puts the basin at step {step(forecast.d_star)}"
        high = forecast.d_star_high
        # (some draws see no basin at all: the band has no upper end)
        band = (
            f"band from {step(forecast.d_star_low)}, open-ended"
            if step(high) == "inf"  # (inf, or beyond what a step is written as)
            else f"band {step(forecast.d_star_low)} to {step(high)}"
        )
        where = f"{step(forecast.d_star)} ({band})"
        at = forecast.loss_at_d_star
        at = f", {self.monitor} there ≈ {at:.4g}" if at is not None else ""
        if forecast.state == "basin entered":
            return f"basin entered: forecast at step {where}{at}; now at step {step(forecast.x)}"
        if forecast.state == "improving":
            return f"improving at step {step(forecast.x)}: basin forecast at step {where}{at}"
        steps = step(forecast.steps_to_basin)
        away = f"{steps} step{'' if steps == '1' else 's'} from step {step(forecast.x)}"
        return f"{forecast.state} at step {where}{at}, {away}"

    # -- state -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "forecaster": self.forecaster.state_dict(),
            "announced": self.announced,
            "said_departure": self.said_departure,
            "said_nonfinite": self.said_nonfinite,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.forecaster.load_state_dict(state["forecaster"])
        self.announced = state["announced"]
        self.said_departure = state.get("said_departure", False)
        self.said_nonfinite = state.get("said_nonfinite", False)


def _evidence(forecast: Forecast) -> str:
    """What a warning or stop stands on, from the forecaster's note ("" when it says nothing of it)."""
    note = forecast.note
    if note.startswith("evidence: ") or note.startswith("the monitored loss has risen"):
        return f"; {note}"
    return ""

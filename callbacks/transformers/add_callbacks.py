"""Adding snrmon's callbacks where the values they log reach the Trainer's reporting integrations."""

from __future__ import annotations

from transformers import Trainer, TrainerCallback


def add_callbacks(trainer: Trainer, *callbacks: TrainerCallback) -> None:
    """Put ``callbacks`` first in ``trainer``'s callbacks, in the order given (moving them there if the
    Trainer has them already).

    ``Trainer.log`` hands one ``logs`` dict to each callback's ``on_log`` in turn, and the reporting
    integrations (``report_to``: TensorBoard, W&B, MLflow, ...) come before the callbacks passed as
    ``Trainer(callbacks=...)``: values added to ``logs`` there reach ``trainer.state.log_history`` and the
    callbacks after them, but not the integrations. Callbacks placed first add theirs before any integration
    reads ``logs``.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
        add_callbacks(trainer, SNRMonitorCallback(), BasinEarlyStoppingCallback())
        trainer.train()
    """
    handler = trainer.callback_handler
    for callback in callbacks:
        if not isinstance(callback, TrainerCallback):
            raise TypeError(f"add_callbacks takes TrainerCallback instances, got {type(callback).__name__}")
        if callback in handler.callbacks:
            handler.callbacks.remove(callback)
    handler.callbacks[:0] = callbacks
    for callback in callbacks:
        if hasattr(callback, "ahead_of_integrations"):  # snrmon's: no warning that its values miss them
            callback.ahead_of_integrations = True

"""snrmon in a Hugging Face ``Trainer``: a tiny GPT-2 (random weights, from a config) learns a short text.

``SNRMonitorCallback`` logs the gradient signal, noise and noise scale at every training log;
``BasinEarlyStoppingCallback`` forecasts where the held-out loss turns up, as the model memorises the few
training lines, and stops there. Runs on a CPU in about 15 s; needs ``pip install snrmon[hf]``.

    python examples/hf_trainer.py [--out runs/hf]   # then: tensorboard --logdir runs/hf
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from snrmon.callbacks.transformers import BasinEarlyStoppingCallback, SNRMonitorCallback, add_callbacks

TEXT = """\
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of
foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light,
it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had
everything before us, we had nothing before us, we were all going direct to Heaven, we were all going
direct the other way.
"""
CONTEXT = 32


class Windows(Dataset):
    """Every window of ``CONTEXT`` characters of ``text``, as input ids and labels (a character each)."""

    def __init__(self, text: str, alphabet: str):
        ids = torch.tensor([alphabet.index(c) for c in text])
        self.windows = ids.unfold(0, CONTEXT, 1)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[index], "labels": self.windows[index]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/hf", help="output and TensorBoard directory")
    parser.add_argument("--max-steps", type=int, default=400)
    options = parser.parse_args()
    torch.manual_seed(0)
    alphabet = "".join(sorted(set(TEXT)))
    cut = int(0.75 * len(TEXT))  # the first lines to learn, the last ones held out
    train, held_out = Windows(TEXT[:cut], alphabet), Windows(TEXT[cut:], alphabet)
    config = GPT2Config(vocab_size=len(alphabet), n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config)  # random weights: nothing is downloaded
    args = TrainingArguments(
        output_dir=options.out,
        use_cpu=True,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,  # two microbatches a step: the monitor's two batch sizes
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        max_steps=options.max_steps,
        eval_strategy="steps",
        eval_steps=5,
        logging_steps=5,  # the training loss at every evaluation, for the forecast
        save_strategy="no",
        report_to="tensorboard",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out)
    monitor, stopper = SNRMonitorCallback(), BasinEarlyStoppingCallback()
    add_callbacks(trainer, monitor, stopper)  # first: their values reach TensorBoard too
    trainer.train()
    noise_scale = monitor.latest["snr/noise_scale"]
    print(f"\nnoise scale at step {trainer.state.global_step}: {noise_scale:.4g} tokens")
    print(stopper.stopping_reason or "not stopped: no basin within the steps run")


if __name__ == "__main__":
    main()

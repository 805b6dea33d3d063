"""A run killed with SIGKILL (mid-epoch, or while a checkpoint is being written) resumes to
exactly the weights of a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from cxr.workflows.train import train_run

pytestmark = pytest.mark.slow  # child processes that train and SIGKILL themselves

EPOCHS = 3

# The child process trains the run and SIGKILLs itself at a chosen moment. The moment is
# reached through the library's own hooks (a callback, the atomic writer's rename), so the
# kill lands at the same place on every machine, without sleeps or timing.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import cxr.utils
    from cxr.engine.trainer import TrainCallbacks
    from cxr.workflows.train import train_run

    run, mode = sys.argv[1], sys.argv[2]

    class KillMidEpoch(TrainCallbacks):
        def on_step(self, step, steps, loss, images_per_s):
            if self.epoch == 2 and step >= 1:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_epoch_start(self, epoch, max_epochs, steps):
            self.epoch = epoch

    if mode == "checkpoint-write":
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith("checkpoint.pt") and os.path.exists(dst):
                # The second checkpoint's bytes are in the temporary file; die before the rename.
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
        cxr.utils.os.replace = replace
        train_run(run)
    else:
        train_run(run, callbacks=KillMidEpoch())
    """
)


def _killed_run(tmp_path: Path, make_run, mode: str) -> Path:
    run = make_run(tmp_path / mode, max_epochs=EPOCHS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(run), mode], env=env, capture_output=True, text=True
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    return run


def _assert_same_weights(run_a: Path, run_b: Path) -> None:
    a = torch.load(run_a / "checkpoint.pt", weights_only=True)
    b = torch.load(run_b / "checkpoint.pt", weights_only=True)
    assert a["state"]["epoch"] == b["state"]["epoch"] == EPOCHS
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    best_a = load_file(str(run_a / "model.safetensors"))
    best_b = load_file(str(run_b / "model.safetensors"))
    assert best_a.keys() == best_b.keys()
    for key in best_a:
        assert torch.equal(best_a[key], best_b[key]), key
    log_a = pd.read_csv(run_a / "log.csv")
    log_b = pd.read_csv(run_b / "log.csv")
    for column in ("epoch", "train_loss", "val_loss", "val_auroc_mean", "lr"):
        assert log_a[column].tolist() == log_b[column].tolist(), column


@pytest.fixture
def one_thread():
    """The child trains with one thread; float sums depend on the thread count, so match it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, make_run, one_thread):
    run = _killed_run(tmp_path, make_run, "mid-epoch")
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["state"]["epoch"] == 1  # epoch 2 died before its checkpoint

    train_run(run, resume=True)
    reference = make_run(tmp_path / "reference", max_epochs=EPOCHS)
    train_run(reference)
    _assert_same_weights(run, reference)


def test_sigkill_during_checkpoint_write_keeps_the_last_good_checkpoint(
    tmp_path, make_run, one_thread
):
    run = _killed_run(tmp_path, make_run, "checkpoint-write")
    # The old checkpoint is whole (the new one never replaced it) and loads safely.
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["state"]["epoch"] == 1
    leftovers = list(run.glob(".checkpoint.pt.*.tmp"))
    assert leftovers, "the interrupted write should have left its temporary file"

    train_run(run, resume=True)
    assert not list(run.glob(".checkpoint.pt.*.tmp")), "resume should clear stale temp files"
    reference = make_run(tmp_path / "reference", max_epochs=EPOCHS)
    train_run(reference)
    _assert_same_weights(run, reference)

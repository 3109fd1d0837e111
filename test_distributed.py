"""train.py under torchrun, on the CPU (Gloo, 2 processes, launched as users launch it): sharded valuation and
evaluation equal the single process's, every process builds the same re-sampling plan, and a run trains, writes one
log and resumes.

Run as a script (`python -m torch.distributed.run ... test_distributed.py OUT`), this file is the worker of the
first test: with fixed weights, it values and evaluates a data set of an odd number of samples, so that
DistributedSampler pads, and saves what its process got."""
import os
import subprocess
import sys

import pytest
import torch

import data
import models
import train
from conftest import SYNTHETIC, logged

NUM_SAMPLES = 45  # odd: the sampler repeats an item to give both processes 23
LOADER = dict(batch_size=8, num_workers=0)


def synthetic_set():
    return data.build_dataset("synthetic", "train", seed=0, train_size=NUM_SAMPLES, size=16)


def passes_and_plans(model, dataset, device):
    """What the first test compares: one pass over the data set and the plan of each re-sampling mode."""
    outcome = dict(result=train.pass_over(model, dataset, LOADER, device))
    for mode in ("sample", "modality", "naive", "reversed"):
        outcome[mode] = train.resampling_plan(mode, model, dataset, LOADER, device, torch.Generator().manual_seed(5))
    return outcome


def torchrun(*args, timeout=240):
    """`torchrun --standalone --nproc-per-node 2 args` in this folder, one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_sharded_valuation_evaluation_and_plans_equal_the_single_process(tmp_path):
    dataset = synthetic_set()
    torch.manual_seed(0)
    model = models.build_model(dataset.input_specs, dataset.num_classes)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torchrun("test_distributed.py", tmp_path)
    single = passes_and_plans(model, dataset, torch.device("cpu"))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for got in ranks:
        assert torch.equal(got["result"]["index"], torch.arange(NUM_SAMPLES))  # sample order, padding dropped
        for key in ("labels", "prediction", "correct"):
            assert torch.equal(got["result"][key], single["result"][key]), key
        torch.testing.assert_close(got["result"]["scores"], single["result"]["scores"])
        got_metrics, single_metrics = train.metrics(got["result"]), train.metrics(single["result"])
        assert got_metrics.keys() == single_metrics.keys()
        for key in got_metrics:  # pytest.approx compares flat values only (acc_per_modality is a list)
            assert got_metrics[key] == pytest.approx(single_metrics[key]), key
        for mode in ("sample", "modality", "naive", "reversed"):
            for got_part, single_part in zip(got[mode], single[mode]):  # valued, phi, copies
                assert torch.equal(got_part, single_part), mode


def test_a_two_process_run_trains_writes_one_log_and_resumes(tmp_path):
    # the 2-process run of every mode and a resume under torchrun take minutes: test_distributed_modes, slow
    out = tmp_path / "run"
    flags = [*SYNTHETIC, "--synthetic-samples", "45", "--batch-size", "8", "--mode", "sample", "--epochs", "2"]
    done = torchrun("train.py", *flags, "--out", out)
    assert done.stdout.count("epoch   1   sample") == 1  # rank 0 alone reports
    log = logged(out)
    assert [r["epoch"] for r in log] == [0, 1] and log[1]["train_samples"] >= 45 + sum(log[1]["copies"])
    assert sorted(os.listdir(out / "contributions")) == ["epoch_001.npz"]
    train.main(["--resume", str(out / "last.pt"), "--epochs", "3"])  # any number of processes resumes it
    assert [r["epoch"] for r in logged(out)] == [0, 1, 2]
    assert logged(out)[:2] == log


if __name__ == "__main__":  # the worker of the first test, one per process
    torch.set_num_threads(1)
    out = sys.argv[1]
    device = train.setup_distributed(-1)
    dataset = synthetic_set()
    model = models.build_model(dataset.input_specs, dataset.num_classes)
    model.load_state_dict(torch.load(os.path.join(out, "weights.pt")))
    torch.save(passes_and_plans(model, dataset, device), os.path.join(out, f"rank{train.world()[0]}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["baseline", "modality", "naive", "reversed"])
def test_distributed_modes(tmp_path, mode):
    out = tmp_path / "run"
    flags = [*SYNTHETIC, "--synthetic-samples", "45", "--batch-size", "8", "--mode", mode, "--epochs", "2"]
    torchrun("train.py", *flags, "--out", out)
    assert [r["epoch"] for r in logged(out)] == [0, 1]
    torchrun("train.py", "--resume", out / "last.pt", "--epochs", "3")
    assert [r["epoch"] for r in logged(out)] == [0, 1, 2]

"""train.py under torchrun, on the CPU (Gloo, processes launched as users launch them): for fixed weights, sharded
valuation and evaluation, the re-sampling plans, the compared methods' statistics and the gathered online table equal
the single process's; every mode trains, writes one log and resumes; every process takes as many steps for any data
size.

Run as a script (`python -m torch.distributed.run ... test_distributed.py OUT`), this file is the worker of the
first test: with fixed weights, it values and evaluates a data set of an odd number of samples, so that
DistributedSampler pads, and saves what its process got."""
import os
import subprocess
import sys

import pytest
import torch
import torchvision

import comparators
import data
import engine
import method
import models
import train
from conftest import MFEAT, SYNTHETIC, NarrowResNet18, fails, logged

NUM_SAMPLES = 45  # odd: the sampler repeats an item to give both processes 23
LOADER = dict(batch_size=8, num_workers=0)
BATCH = list(range(0, 32, 2))  # the global batch of the methods' statistics; process r takes BATCH[r::2]


def synthetic_set():
    return data.build_dataset("synthetic", "train", seed=0, train_size=NUM_SAMPLES, size=16)


def offline_plan(mode, model, dataset, device):
    valuation = method.OfflineValuation(dataset, LOADER, device)
    plan = method.METHODS[mode](valuation, torch.Generator().manual_seed(5), len(dataset)).plan(0, model)
    return plan.valued, plan.phi, plan.copies


def method_statistics(model, dataset, device, rows):
    """For fixed weights in eval mode, what each compared method and online valuation compute from the batch of
    `rows` (this process's share of the global batch), with their reductions over the processes."""
    inputs, target, index = (torch.utils.data.default_collate([dataset[k] for k in rows]))
    mask = torch.ones(len(rows), 2, dtype=torch.bool)
    model.eval()
    got = {}
    for name, response in (("ogm-ge", comparators.OGMGE(2, 0.5)), ("agm", comparators.AGM(2, 1.0))):
        response.start_epoch(0, True, model)
        response.loss(model, inputs, target)
        got[name] = response.coefficients
    pmr = comparators.PMR(2, dataset, LOADER, device, torch.Generator().manual_seed(5), 1.0, 0.2, 0.5)
    pmr.start_epoch(0, True, model)  # prototypes from a sharded pass
    pmr.loss(model, inputs, target)
    got["pmr"] = dict(prototypes=pmr.prototypes, weights=pmr.weight_sums)
    blending = comparators.GBlending(2, dataset, LOADER, device, 2)
    blending.start_epoch(0, True, model)
    blending.loss(model, inputs, target)
    blending.end_epoch(0, model)  # training losses over every process's steps, validation losses from a sharded pass
    got["gblending"] = dict(train=blending.train_losses[0], val=blending.val_losses[0])
    valuation = method.OnlineValuation(len(dataset), 2)
    online = method.SampleLevel(valuation, torch.Generator().manual_seed(5), len(dataset), warmup=1)
    valuation.start_recording(True)
    online.loss(model, inputs, target, mask, index)  # each process values the rows of its own steps
    plan = online.plan(1, model)  # the tables gathered, then the plan
    got["online"] = (plan.valued, plan.phi, plan.copies)
    return got


def passes_and_plans(model, dataset, device, rows):
    """What the first test compares: one pass over the data set, the plan of each re-sampling mode, and the
    methods' statistics."""
    outcome = dict(result=engine.valuation_pass(model, dataset, LOADER, device))
    for mode in ("sample", "modality", "naive", "reversed"):
        outcome[mode] = offline_plan(mode, model, dataset, device)
    outcome["methods"] = method_statistics(model, dataset, device, rows)
    return outcome


def torchrun(*args, processes=2, timeout=240):
    """`torchrun --standalone --nproc-per-node 2 args` in this folder, one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_close_tree(got, expected, where=""):
    """Nested dicts, lists and tensors equal up to float rounding (the order of a sum over processes)."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_close_tree(got[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for k, (g, e) in enumerate(zip(got, expected)):
            assert_close_tree(g, e, f"{where}/{k}")
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(got, expected, msg=where, check_dtype=True)
    else:
        assert got == pytest.approx(expected), where


def test_sharded_passes_plans_and_method_statistics_equal_the_single_process(tmp_path):
    dataset = synthetic_set()
    torch.manual_seed(0)
    model = models.build_model(dataset.input_specs, dataset.num_classes)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torchrun("test_distributed.py", tmp_path)
    single = passes_and_plans(model, dataset, torch.device("cpu"), BATCH)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for got in ranks:
        assert torch.equal(got["result"]["index"], torch.arange(NUM_SAMPLES))  # sample order, padding dropped
        for key in ("labels", "prediction", "correct"):
            assert torch.equal(got["result"][key], single["result"][key]), key
        torch.testing.assert_close(got["result"]["scores"], single["result"]["scores"])
        assert_close_tree(engine.metrics(got["result"]), engine.metrics(single["result"]))
        for mode in ("sample", "modality", "naive", "reversed"):
            for got_part, single_part in zip(got[mode], single[mode]):  # valued, phi, copies
                assert torch.equal(got_part, single_part), mode
        assert_close_tree(got["methods"], single["methods"])
    assert ranks[0]["methods"]["online"][0].tolist() == BATCH  # the table of both processes' rows


@pytest.mark.slow
@pytest.mark.full_resnet  # resumed here from the checkpoint torchrun's processes wrote
def test_a_two_process_run_trains_writes_one_log_and_resumes(tmp_path):
    # with test_every_mode_runs_under_torchrun_and_resumes, under -m slow: the default suite launches torchrun once
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


@pytest.mark.parametrize("batches, world_size", [(3, 8), (1, 3), (5, 2), (4, 4)])
def test_every_process_takes_as_many_steps_whatever_the_data_size(batches, world_size):
    """The composed epoch is shared out in whole batches; with fewer batches than processes, batches repeat until
    every process has one (three batches could not be padded to eight processes before)."""
    base = data.build_dataset("synthetic", "train", seed=0, train_size=4 * batches, size=8)
    epoch_set = data.ResampledDataset(base, torch.zeros(0), torch.zeros(0))
    shares = []
    for rank in range(world_size):
        sampler = data.TrainingBatches(epoch_set, 4, torch.Generator().manual_seed(0), rank, world_size)
        shares.append(list(sampler))
    steps = {len(share) for share in shares}
    assert steps == {-(-batches // world_size)}  # the same number of steps for every process
    assert sorted({k for share in shares for batch in share for k in batch}) == list(range(len(base)))


def test_world_size_without_torchrun_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in engine.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    message = fails(capsys, MFEAT + ["--out", str(tmp_path / "run")])
    assert "WORLD_SIZE=2" in message and "RANK" in message and "torchrun" in message
    assert not (tmp_path / "run").exists()


if __name__ == "__main__":  # the worker of the first test, one per process
    torch.set_num_threads(1)
    out = sys.argv[1]
    device = engine.setup_distributed(-1)
    torchvision.models.resnet18 = lambda weights=None, norm_layer=torch.nn.BatchNorm2d: NarrowResNet18(norm_layer)
    dataset = synthetic_set()
    model = models.build_model(dataset.input_specs, dataset.num_classes)  # as the test's, conftest's narrower one
    model.load_state_dict(torch.load(os.path.join(out, "weights.pt")))
    rank = engine.world()[0]
    torch.save(passes_and_plans(model, dataset, device, BATCH[rank::2]), os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--mode", "baseline"]]
                         + [["--mode", m, "--warmup", "1"] for m in train.MODES if m not in ("baseline", "greedy")]
                         + [["--mode", "greedy", "--fusion", "mmtm", "--warmup", "1"],
                            ["--mode", "sample", "--valuation", "online", "--warmup", "1"],
                            ["--mode", "pmr", "--track-phi", "--warmup", "1"]])
def test_every_mode_runs_under_torchrun_and_resumes(tmp_path, flags):
    out = tmp_path / "run"
    torchrun("train.py", *MFEAT, *flags, "--epochs", "2", "--out", out)
    assert [r["epoch"] for r in logged(out)] == [0, 1]
    torchrun("train.py", "--resume", out / "last.pt", "--epochs", "3")
    assert [r["epoch"] for r in logged(out)] == [0, 1, 2]


@pytest.mark.slow
def test_three_processes_finish_an_epoch_of_fewer_batches_than_processes(tmp_path):
    torchrun("train.py", "--dataset", "synthetic", "--synthetic-samples", "3", "--synthetic-size", "8", "--epochs", "2",
             "--warmup", "1", "--gpu", "-1", "--out", tmp_path / "run", processes=3, timeout=180)
    assert [r["epoch"] for r in logged(tmp_path / "run")] == [0, 1]

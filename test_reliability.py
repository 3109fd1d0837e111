"""Reliability of train.py: deterministic runs, exact resume, atomic checkpoints, and one clear line
for every kind of bad input (the file or flag at fault and what was expected), with nothing already
written lost."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
import torchvision

import engine
import models
import train
from conftest import (MFEAT, KS_LISTS, MMDEBIASED_TABLE, assert_same_weights, fails, logged, make_ks_tree,
                      make_mmdebiased_tree, make_ucf_tree, run, weights)


# ----------------------------------------------------------------------------------------------
# exact resume (two runs compared: determinism too)


@pytest.mark.parametrize("mode", ["baseline", "sample", "modality"])
@pytest.mark.parametrize("stop", [1, 3], ids=["stop-in-warmup", "stop-after-warmup"])
def test_resume_continues_exactly(tmp_path, mode, stop):
    flags = MFEAT + ["--mode", mode, "--lr-step", "2", "--seed", "3"] + (["--warmup", "2"] if mode != "baseline" else [])
    run(tmp_path / "straight", *flags, "--epochs", "4")
    run(tmp_path / "split", *flags, "--epochs", str(stop))
    train.main(["--resume", str(tmp_path / "split" / "last.pt"), "--epochs", "4"])
    assert logged(tmp_path / "split") == logged(tmp_path / "straight")
    assert_same_weights(weights(tmp_path / "split" / "last.pt"), weights(tmp_path / "straight" / "last.pt"))
    assert_same_weights(weights(tmp_path / "split" / "best.pt"), weights(tmp_path / "straight" / "best.pt"))
    saved = torch.load(tmp_path / "split" / "last.pt", weights_only=False)
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "plan", "rng", "args"):
        assert key in saved


# ----------------------------------------------------------------------------------------------
# atomic writes and run directories


def test_a_run_killed_while_saving_leaves_loadable_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    flags = MFEAT + ["--mode", "sample", "--warmup", "1", "--epochs", "3"]
    run(tmp_path / "straight", *flags)
    real_save = torch.save

    def killed_while_saving_last_of_epoch_1(obj, f):
        if obj["epoch"] == 1 and os.path.basename(f.name).startswith("last.pt"):
            f.write(b"partial")
            raise KeyboardInterrupt
        real_save(obj, f)

    monkeypatch.setattr(train.torch, "save", killed_while_saving_last_of_epoch_1)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path / "killed", *flags)
    assert stop.value.code == 130
    monkeypatch.setattr(train.torch, "save", real_save)
    last = torch.load(tmp_path / "killed" / "last.pt", weights_only=False)
    assert last["epoch"] == 0  # the previous last.pt, intact
    torch.load(tmp_path / "killed" / "best.pt", weights_only=False)
    train.main(["--resume", str(tmp_path / "killed" / "last.pt")])
    assert logged(tmp_path / "killed") == logged(tmp_path / "straight")
    assert_same_weights(weights(tmp_path / "killed" / "last.pt"), weights(tmp_path / "straight" / "last.pt"))


def test_a_second_run_into_a_run_directory_refuses_unless_told(tmp_path, capsys):
    flags = MFEAT + ["--mode", "sample", "--warmup", "1", "--epochs", "2"]
    run(tmp_path / "run", *flags)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    message = fails(capsys, flags + ["--out", str(tmp_path / "run")])
    assert "already holds a run" in message and "--resume" in message and "--overwrite" in message
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    run(tmp_path / "run", *MFEAT, "--mode", "baseline", "--epochs", "1", "--overwrite")
    assert len(train.load_log(tmp_path / "run" / "log.jsonl")) == 1
    assert os.listdir(tmp_path / "run" / "contributions") == []  # the old run's valuations are gone


# ----------------------------------------------------------------------------------------------
# bad input: one line naming the file or flag, exit status 2


def ks_flags(root, *more):
    return ["--dataset", "ks", "--data-root", str(root), "--image-size", "32", "--epochs", "1", "--warmup", "0",
            "--batch-size", "4", "--workers", "0", "--gpu", "-1", "--mode", "baseline", "--out", str(root.parent / "run"),
            *more]


def test_ks_trains_end_to_end_from_a_fixture_tree(ks_root):
    results = train.main(ks_flags(ks_root, "--mode", "sample"))
    assert results["modalities"] == ["audio", "visual"] and len(results["test_acc_per_modality"]) == 2


def test_missing_data_root(tmp_path, capsys):
    message = fails(capsys, ks_flags(tmp_path / "nowhere"))
    assert "nowhere" in message and "not found" in message
    assert not (tmp_path / "run").exists()  # nothing written
    assert "--data-root" in fails(capsys, ["--dataset", "ks", "--epochs", "1"])


def test_missing_list_or_split_file(ks_root, tmp_path, capsys):
    (ks_root / "ks_audio" / "val_1fps_path.txt").unlink()
    assert "val_1fps_path.txt" in fails(capsys, ks_flags(ks_root))
    message = fails(capsys, ["--dataset", "mmdebiased", "--data-root", str(tmp_path), "--epochs", "1", "--warmup", "0",
                             "--split-file", str(tmp_path / "MM-Debiased.json")])
    assert "MM-Debiased.json" in message and "not found" in message


def test_missing_spectrogram_or_frames_and_skip_missing(ks_root, capsys):
    (ks_root / "ks_audio" / "train" / "b1.npy").unlink()
    assert "b1.npy not found" in fails(capsys, ks_flags(ks_root))
    for frame in (ks_root / "ks_visual" / "train" / "a2").iterdir():
        frame.unlink()
    np.save(ks_root / "ks_audio" / "train" / "b1.npy", np.zeros((16, 8), dtype=np.float32))
    assert "a2 holds no .jpg frames" in fails(capsys, ks_flags(ks_root))
    train.main(ks_flags(ks_root, "--skip-missing"))
    out = capsys.readouterr().out
    assert "skipped 1 train clips with missing files: a2" in out


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_jpeg_found_while_training(ks_root, capsys, workers):
    for frame in (ks_root / "ks_visual" / "train" / "b1").iterdir():
        frame.write_bytes(b"not a jpeg")
    message = fails(capsys, ks_flags(ks_root, "--workers", workers))
    assert "b1" in message and ".jpg: cannot read JPEG" in message


@pytest.mark.slow  # about 10 s; test_corrupt_jpeg_found_while_training stays in the default run
def test_corrupt_jpeg_found_later_keeps_what_was_written(ks_root, capsys):
    train.main(ks_flags(ks_root))
    run_dir = ks_root.parent / "run"
    written = {name: (run_dir / name).read_bytes() for name in ("last.pt", "best.pt", "log.jsonl")}
    for frame in (ks_root / "ks_visual" / "train" / "b1").iterdir():
        frame.write_bytes(b"not a jpeg")
    message = fails(capsys, ["--resume", str(run_dir / "last.pt"), "--epochs", "2"])
    assert "b1" in message and ".jpg: cannot read JPEG" in message
    assert {name: (run_dir / name).read_bytes() for name in written} == written
    assert torch.load(run_dir / "last.pt", weights_only=False)["epoch"] == 0


@pytest.mark.parametrize("array, expected", [
    (np.zeros((2, 16, 8), dtype=np.float32), "spectrogram must be 2-D"),
    (np.full((16, 8), np.nan, dtype=np.float32), "spectrogram contains NaN"),
])
def test_bad_spectrogram(ks_root, capsys, array, expected):
    np.save(ks_root / "ks_audio" / "train" / "a1.npy", array)
    message = fails(capsys, ks_flags(ks_root))
    assert "a1.npy" in message and expected in message


def test_label_out_of_range_unknown_class_and_empty_split(tmp_path, capsys):
    quick = ["--epochs", "1", "--warmup", "0", "--workers", "0", "--gpu", "-1"]
    ucf = tmp_path / "ucf"
    make_ucf_tree(ucf, groups=range(8, 10), clips_per_group=1, test_groups=range(1, 2))
    trainlist, testlist = ucf / "splits" / "trainlist01.txt", ucf / "splits" / "testlist01.txt"
    lines = trainlist.read_text().splitlines()
    trainlist.write_text("\n".join([lines[0].rsplit(" ", 1)[0] + " 99"] + lines[1:]) + "\n")
    message = fails(capsys, ["--dataset", "ucf101", "--data-root", str(ucf)] + quick)
    assert "trainlist01.txt:1" in message and "label 99 out of range" in message

    trainlist.write_text("\n".join(lines) + "\n")
    testlist.write_text(testlist.read_text() + "Juggling/v_Juggling_g01_c01.avi\n")
    message = fails(capsys, ["--dataset", "ucf101", "--data-root", str(ucf)] + quick)
    assert "testlist01.txt" in message and "unknown class name 'Juggling'" in message

    table = {k: v for k, v in MMDEBIASED_TABLE.items() if v["subset"] != "validation"}
    split_file = make_mmdebiased_tree(tmp_path / "mmd", table)
    message = fails(capsys, ["--dataset", "mmdebiased", "--data-root", str(tmp_path / "mmd"),
                             "--split-file", str(split_file)] + quick)
    assert "MM-Debiased.json" in message and "no clips with subset 'validation'" in message


def test_unknown_view_name(capsys):
    message = fails(capsys, ["--views", "pix,shape"])
    assert "--views" in message and "shape" in message and "fou" in message


def test_checkpoint_from_another_data_set_class_count_or_model(tmp_path, ks_root, capsys):
    run(tmp_path / "mfeat", *MFEAT, "--epochs", "1", "--warmup", "0")
    checkpoint = str(tmp_path / "mfeat" / "last.pt")
    message = fails(capsys, ["--resume", checkpoint, "--dataset", "synthetic"])
    assert "--dataset 'synthetic' differs from the checkpoint's 'mfeat'" in message
    assert "--fusion 'sum' differs" in fails(capsys, ["--eval-only", "--resume", checkpoint, "--fusion", "sum"])

    train.main(ks_flags(ks_root))  # 3 classes
    other = tmp_path / "ks4"
    make_ks_tree(other, dict(KS_LISTS, test=[("a3", 0), ("d3", 3)]))  # 4 classes
    message = fails(capsys, ["--eval-only", "--resume", str(tmp_path / "run" / "last.pt"),
                             "--data-root", str(other)])
    assert "num_classes: checkpoint 3, this run 4" in message

    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    assert "foreign.pt could not be read" in fails(capsys, ["--eval-only", "--resume",
                                                            str(tmp_path / "foreign.pt")])
    torch.save({"weights": 1}, tmp_path / "other.pt")
    assert "not written by train.py" in fails(capsys, ["--resume", str(tmp_path / "other.pt")])


def test_warmup_not_smaller_than_epochs_warns(tmp_path, capsys):
    run(tmp_path / "run", *MFEAT, "--mode", "sample", "--epochs", "2", "--warmup", "2")
    err = capsys.readouterr().err
    assert "--warmup 2 is not smaller than --epochs 2" in err and "no re-sampling" in err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    flags = MFEAT + ["--mode", "baseline", "--epochs", "3", "--out", str(tmp_path / "run")]
    original = engine.train_one_epoch

    def poisoned(step, loader, optimizer, scaler, device, epoch, amp):
        if epoch == 1:  # poison a weight, as a diverging run would
            with torch.no_grad():
                engine.unwrap(step).model.head.fc.weight.fill_(float("nan"))
        return original(step, loader, optimizer, scaler, device, epoch, amp)

    monkeypatch.setattr(engine, "train_one_epoch", poisoned)
    message = fails(capsys, flags)
    assert "non-finite loss" in message and "epoch 1, step 1" in message and "last.pt holds epoch 0" in message
    assert_last_good_checkpoint(tmp_path / "run", 0)


def assert_last_good_checkpoint(out, epoch):
    last = torch.load(out / "last.pt", weights_only=False)
    assert last["epoch"] == epoch and all(torch.isfinite(v).all() for v in last["model"].values()
                                          if v.is_floating_point())
    assert len(train.load_log(out / "log.jsonl")) == epoch + 1


def test_an_update_that_breaks_the_weights_stops_before_they_are_saved(tmp_path, capsys, monkeypatch):
    """The loss of every step is finite, but the last update of epoch 1 leaves infinite weights: no checkpoint of
    them is written, and the message's last good epoch is the one last.pt holds."""
    original = engine.train_one_epoch

    def breaks_after(step, loader, optimizer, scaler, device, epoch, amp):
        result = original(step, loader, optimizer, scaler, device, epoch, amp)
        if epoch == 1:
            with torch.no_grad():
                engine.unwrap(step).model.head.fc.weight.fill_(float("inf"))
        return result

    monkeypatch.setattr(engine, "train_one_epoch", breaks_after)
    message = fails(capsys, MFEAT + ["--mode", "baseline", "--epochs", "3", "--out", str(tmp_path / "run")])
    assert "non-finite weights after the updates of epoch 1" in message and "last.pt holds epoch 0" in message
    assert_last_good_checkpoint(tmp_path / "run", 0)


def test_feature_masking_refused_for_fusions_that_mix_inside(capsys):
    message = fails(capsys, ["--fusion", "mmtm", "--mask", "feature", "--epochs", "1", "--warmup", "0"])
    assert "--fusion mmtm" in message and "--mask input" in message


# ----------------------------------------------------------------------------------------------
# flags no run can use, run directories that cannot be written, history, interruptions


@pytest.mark.parametrize("flags, expected", [
    (["--batch-size", "0"], "--batch-size: expected a value >= 1, got 0"),
    (["--lr", "-0.1"], "--lr: expected a value > 0.0, got -0.1"),
    (["--lr", "0"], "--lr: expected a value > 0.0, got 0"),
    (["--workers", "-1"], "--workers: expected a value >= 0, got -1"),
    (["--views", "pix,pix"], "--views: pix,pix: each view may be named once"),
    (["--mfeat-degrade", "2"], "--mfeat-degrade: expected a value >= 0.0 and <= 1.0, got 2"),
    (["--dataset", "synthetic", "--synthetic-samples", "0"], "--synthetic-samples: expected a value >= 3, got 0"),
    (["--image-size", "0"], "--image-size: expected a value >= 8, got 0"),
    (["--epochs", "ten"], "--epochs: expected an integer, got 'ten'"),
    (["--split-file", "x.json"], "--split-file has no effect in this run: it acts with --dataset mmdebiased only"),
    (["--views", "fac,pix", "--mfeat-weak-signal", "0.2", "--mfeat-degrade", "0.5"],
     "--mfeat-weak-signal needs two or more --views, a value below 1 and no --mfeat-degrade"),
    (["--views", "fac", "--mode", "baseline", "--mfeat-weak-signal", "0.2"], "--mfeat-weak-signal needs two or more"),
    (["--split-seed", "-1"], "--split-seed: expected a value >= 0, got -1"),
])
def test_flags_no_run_can_use_are_refused_in_one_line(tmp_path, capsys, flags, expected):
    assert expected in fails(capsys, flags + ["--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_run_directory_that_cannot_be_written_is_refused_first(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("kept")
    for out in (blocker, blocker / "run"):
        message = fails(capsys, MFEAT + ["--mode", "baseline", "--epochs", "1", "--out", str(out)])
        assert f"--out {out}" in message and "is a file, not a folder" in message
    assert blocker.read_text() == "kept"


@pytest.mark.parametrize("damage", ["cut", "deleted"])
def test_resume_restores_the_history_from_the_checkpoint(tmp_path, damage):
    flags = MFEAT + ["--mode", "sample", "--warmup", "1"]
    run(tmp_path / "straight", *flags, "--epochs", "3")
    run(tmp_path / "split", *flags, "--epochs", "2")
    log = tmp_path / "split" / "log.jsonl"
    if damage == "cut":
        log.write_bytes(log.read_bytes()[:-20])  # the last record cut mid-line
    else:
        log.unlink()
    train.main(["--resume", str(tmp_path / "split" / "last.pt"), "--epochs", "3"])
    assert logged(tmp_path / "split") == logged(tmp_path / "straight")


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    run(tmp_path / "run", *MFEAT, "--mode", "baseline", "--epochs", "1")
    files = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "run" / "last.pt")]) is None
    assert "nothing left to train" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == files


def test_ctrl_c_prints_one_line_with_the_resume_command(tmp_path, capsys, monkeypatch):
    original = engine.train_one_epoch

    def interrupted(step, loader, optimizer, scaler, device, epoch, amp):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(step, loader, optimizer, scaler, device, epoch, amp)

    monkeypatch.setattr(engine, "train_one_epoch", interrupted)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path / "run", *MFEAT, "--mode", "baseline", "--epochs", "3")
    assert stop.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    last = tmp_path / "run" / "last.pt"
    assert err == [f"error: interrupted in epoch 1: {last} holds epoch 0; continue with: python train.py --resume {last}"]
    monkeypatch.setattr(engine, "train_one_epoch", original)
    train.main(["--resume", str(last)])
    assert [r["epoch"] for r in logged(tmp_path / "run")] == [0, 1, 2]


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_sample_mode_trains_on_a_tiny_audio_visual_tree_with_batches_of_two(tmp_path, seed):
    # 4 clips per split, batch 2, warm-up 1: batches of an original and a copy of another modality used to leave
    # a ResNet with one row, normalised by barely estimated running statistics, and the loss went to nan
    lists = {split: [(f"{split}{k}", k % 2) for k in range(4)] for split in ("train", "val", "test")}
    make_ks_tree(tmp_path / "ks", lists)
    generator = np.random.default_rng(seed)
    for path in (tmp_path / "ks").glob("ks_audio/*/*.npy"):
        np.save(path, generator.standard_normal((16, 8)).astype(np.float32))
    results = train.main(["--dataset", "ks", "--data-root", str(tmp_path / "ks"), "--mode", "sample",
                          "--batch-size", "2", "--warmup", "1", "--epochs", "5", "--image-size", "32", "--workers", "0",
                          "--gpu", "-1", "--seed", str(seed), "--out", str(tmp_path / "run")])
    log = train.load_log(tmp_path / "run" / "log.jsonl")
    assert results is not None and len(log) == 5 and sum(log[-1]["copies"]) > 0
    assert all(np.isfinite(record["train_loss"]) for record in log)


def test_pretrained_weights_from_a_local_file_with_its_checksum(tmp_path, capsys, monkeypatch):
    fake = tmp_path / "resnet18.pth"
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, fake)
    flags = ["--dataset", "synthetic", "--synthetic-samples", "6", "--synthetic-size", "8", "--mode", "baseline",
             "--epochs", "1", "--gpu", "-1", "--pretrained", "--weights", str(fake)]
    message = fails(capsys, flags + ["--out", str(tmp_path / "run")])
    assert message.startswith(f"error: --weights: {fake}: SHA-256") and "f37072fd" in message
    assert not (tmp_path / "run").exists()
    # a file whose checksum is the expected one loads into every ResNet encoder (first conv averaged per channel)
    digest = hashlib.sha256(fake.read_bytes()).hexdigest()
    monkeypatch.setattr(models, "IMAGENET_RESNET18_URL", f"https://x/resnet18-{digest[:8]}.pth")
    train.main(flags + ["--out", str(tmp_path / "run")])
    model = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"]
    assert model["encoders.1.stages.stem.0.weight"].shape == state["conv1.weight"].shape  # the RGB encoder
    assert "--weights FILE is the ImageNet file of --pretrained" in fails(capsys, flags[:-3] + ["--weights", str(fake)])


def test_ucf101_trains_without_imagenet_weights(ucf_root, tmp_path):
    results = train.main(["--dataset", "ucf101", "--data-root", str(ucf_root), "--no-pretrained", "--epochs", "1",
                          "--mode", "baseline", "--image-size", "16", "--batch-size", "8",
                          "--workers", "0", "--gpu", "-1", "--out", str(tmp_path / "run")])
    assert json.load(open(tmp_path / "run" / "args.json"))["pretrained"] is False and results is not None


# ----------------------------------------------------------------------------------------------
# flags that do nothing in the run they are given to: one policy, one line


@pytest.mark.parametrize("flags, flag, where", [
    (["--mbt-layers", "2"], "--mbt-layers", "--fusion mbt"),
    (["--ogm-alpha", "0.5"], "--ogm-alpha", "--mode ogm-ge"),
    (["--mode", "pmr", "--agm-alpha", "1"], "--agm-alpha", "--mode agm"),
    (["--modulation-ends", "3"], "--modulation-ends", "--mode ogm-ge, greedy, pmr, agm, gblending"),
    (["--dataset", "synthetic", "--views", "pix,mor"], "--views", "--dataset mfeat"),
    (["--dataset", "synthetic", "--mfeat-degrade", "0.5"], "--mfeat-degrade", "--dataset mfeat"),
    (["--synthetic-size", "16"], "--synthetic-size", "--dataset synthetic"),
    (["--image-size", "32"], "--image-size", "--dataset ks, mmdebiased, ucf101, cremad"),
    (["--subset-ratio", "0.5"], "--subset-ratio", "--mode modality"),
    (["--mode", "sample", "--alpha", "2"], "--alpha", "--mode modality"),
    (["--optimizer", "adam", "--momentum", "0.5"], "--momentum", "--optimizer sgd"),
    (["--lr-step", "0", "--lr-gamma", "0.5"], "--lr-gamma", "--lr-step > 0"),
    (["--eval-split", "val"], "--eval-split", "--eval-only"),
])
def test_a_flag_without_effect_in_the_run_is_refused_in_one_line(tmp_path, capsys, flags, flag, where):
    message = fails(capsys, flags + ["--epochs", "1", "--out", str(tmp_path / "run")])
    assert message == f"error: {flag} has no effect in this run: it acts with {where} only"
    assert not (tmp_path / "run").exists()


def test_a_compared_method_that_could_never_act_is_refused(tmp_path, capsys):
    message = fails(capsys, MFEAT + ["--mode", "agm", "--warmup", "2", "--modulation-ends", "1",
                                     "--out", str(tmp_path / "run")])
    assert "--modulation-ends 1" in message and "--warmup 2" in message and "never act" in message
    assert not (tmp_path / "run").exists()


def test_inputs_too_large_for_mbt_are_refused_before_the_run_folder_exists(tmp_path, capsys):
    message = fails(capsys, ["--dataset", "synthetic", "--synthetic-samples", "3", "--synthetic-size", "260",
                             "--fusion", "mbt", "--mbt-patch", "1", "--gpu", "-1", "--out", str(tmp_path / "run")])
    assert message.startswith("error: --fusion mbt: MBT: 1 frames of 260 x 260 patches") and "larger patch" in message
    assert not (tmp_path / "run").exists()


def test_the_data_root_is_kept_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = train.make_args(dataset="ks", data_root="clips")
    assert args.data_root == str(tmp_path / "clips")


def test_presets_ask_for_no_more_loader_workers_than_cores():
    assert all(preset["workers"] <= len(os.sched_getaffinity(0)) for preset in train.PRESETS.values())


# ----------------------------------------------------------------------------------------------
# fourth round: shared checkpoints, flags of a run that continues, the environment, values, Ctrl-C


class RunsCode:
    """An object whose unpickling runs a command: what a malicious shared checkpoint would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def short_run(tmp_path):
    run(tmp_path / "run", *MFEAT, "--mode", "sample", "--warmup", "1", "--epochs", "2")
    return tmp_path / "run"


@pytest.mark.parametrize("flags", [["--eval-only"], ["--epochs", "3"]], ids=["eval-only", "resume"])
def test_a_checkpoint_that_would_run_code_is_refused_unread(short_run, tmp_path, capsys, flags):
    marker = tmp_path / "ran"
    checkpoint = torch.load(short_run / "best.pt", weights_only=False)
    checkpoint["extra"] = RunsCode(marker)
    torch.save(checkpoint, short_run / "best.pt")
    line = fails(capsys, ["--resume", str(short_run / "best.pt"), *flags])
    assert "holds objects train.py never writes (posix.system" in line and "refused unread" in line
    assert not marker.exists()


def test_a_checkpoint_of_an_incompatible_version_is_refused_in_one_line(short_run, capsys):
    checkpoint = torch.load(short_run / "last.pt", weights_only=False)
    checkpoint["args"]["views"] = "pix,mor"  # an older train.py saved the views as one string
    torch.save(checkpoint, short_run / "last.pt")
    line = fails(capsys, ["--resume", str(short_run / "last.pt"), "--epochs", "3"])
    assert line == (f"error: checkpoint {short_run / 'last.pt'} comes from an incompatible version of train.py "
                    f"(setting views is 'pix,mor', today a list); use the version that wrote it")
    del checkpoint["method"]
    torch.save(checkpoint, short_run / "last.pt")
    assert "incompatible version of train.py (no method)" in fails(capsys, ["--resume", str(short_run / "last.pt")])


@pytest.mark.parametrize("flags, expected", [
    (["--epochs", "3", "--out", "OTHER"], "--out has no effect in this run: it acts with a new run or --eval-only"),
    (["--epochs", "3", "--overwrite"], "--overwrite has no effect in this run: it acts with a new run"),
    (["--eval-only", "--split-file", "MISSING"], "--split-file has no effect in this run: it acts with --dataset "
                                                  "mmdebiased only"),
    (["--eval-only", "--list-dir", "MISSING"], "--list-dir has no effect in this run: it acts with --dataset ks only"),
    (["--eval-split", "val"], "--eval-split has no effect in this run: it acts with --eval-only only"),
])
def test_flags_a_continued_run_would_ignore_are_refused(short_run, capsys, flags, expected):
    assert expected in fails(capsys, ["--resume", str(short_run / "last.pt"), *flags])
    assert not (short_run.parent / "OTHER").exists()


def test_eval_only_writes_into_out(short_run, tmp_path):
    train.main(["--resume", str(short_run / "best.pt"), "--eval-only", "--out", str(tmp_path / "evaluated")])
    assert sorted(os.listdir(tmp_path / "evaluated")) == ["eval_test_best.json", "valuation_test_best.csv",
                                                          "valuation_test_best.png"]
    assert not (short_run / "valuation_test_best.csv").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--amp", "--gpu", "-1"], "--amp has no effect in this run: it acts with a GPU"),
    (["--mode", "baseline", "--valuation", "offline"], "--valuation has no effect in this run: it acts with --mode "
                                                       "sample, modality, naive, reversed or --track-phi only"),
    (["--alpha", "nan", "--mode", "modality"], "argument --alpha: expected a finite number, got nan"),
    (["--subset-ratio", "nan", "--mode", "modality"], "argument --subset-ratio: expected a finite number, got nan"),
    (["--lr", "inf"], "argument --lr: expected a finite number, got inf"),
    (["--out", ""], "argument --out: expected a folder name, got an empty string"),
])
def test_values_and_flags_that_would_do_nothing_or_fail_later(capsys, flags, expected):
    with pytest.raises(SystemExit) as stop:
        train.main(MFEAT + flags)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]


@pytest.mark.parametrize("environment, expected", [
    (dict(RANK="1"), "RANK=1 is set without WORLD_SIZE > 1"),
    (dict(WORLD_SIZE="two"), "WORLD_SIZE=two is not a whole number"),
])
def test_a_torchrun_environment_that_cannot_be_is_one_line(tmp_path, capsys, monkeypatch, environment, expected):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    line = fails(capsys, MFEAT + ["--epochs", "1", "--out", str(tmp_path / "run")])
    assert expected in line and not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_torchrun_with_gpu_on_a_machine_without_cuda_is_refused(tmp_path, capsys, monkeypatch):
    for name, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29999").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stop:
        train.main(["--dataset", "mfeat", "--gpu", "0", "--epochs", "1", "--warmup", "0", "--out", str(tmp_path / "r")])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "rank 0: error: --gpu 0: no CUDA device here; use --gpu -1 for the CPU\n"


def test_ctrl_c_while_a_file_is_written_waits_for_its_end(tmp_path):
    import signal

    def write(f):
        f.write(b"first half ")
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the write
        f.write(b"second half")

    with pytest.raises(KeyboardInterrupt):
        train.write_atomic(str(tmp_path / "file"), write)
    assert (tmp_path / "file").read_bytes() == b"first half second half"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_best_is_the_improving_epochs_last_written_once(tmp_path, monkeypatch):
    """best.pt of an improving epoch holds that epoch's last.pt bytes without a second torch.save, and a later
    last.pt leaves it as it was."""
    saves = []
    real_save = torch.save
    monkeypatch.setattr(train.torch, "save", lambda obj, f: saves.append(os.path.basename(f.name)) or real_save(obj, f))
    run(tmp_path / "run", *MFEAT, "--mode", "baseline", "--epochs", "3", "--lr", "1e-9", "--seed", "1")
    assert all(name.startswith("last.pt") for name in saves) and len(saves) == 3
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert best["epoch"] < last["epoch"] == 2  # lr 1e-9: validation never improves after epoch 0
    assert best["epoch"] == best["best"]["epoch"] and best["log"] == last["log"][:best["epoch"] + 1]

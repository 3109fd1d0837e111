"""Train a multimodal classifier with sample-level modality valuation (Wei et al., CVPR 2024).

One script for every mode of the paper:
    baseline   joint training of all modalities (the "Concatenation" rows of Tables 1-4)
    sample     Algorithm 1: value every training sample each epoch (Eq. 1-3), re-sample its
               low-contributing modalities (Eq. 10)
    modality   Algorithm 2: value a random subset Z, re-sample the overall low-contributing
               modality with probability p (Eq. 11)
    naive      Table 4: as many uni-modal copies per modality as `sample`, on random samples
    reversed   Table 4: the copies go to each sample's highest-contributing modality
    ogm-ge, greedy, pmr, agm, gblending
               the methods the paper compares against (Table 2): no copies, a changed training step
               (comparators.py)

    python train.py                                   # bundled UCI digits, CPU, about ten seconds
    python train.py --dataset ks --data-root /data/ks --mode sample --gpu 0
    python train.py --resume runs/X/last.pt --epochs 80          # continue a run
    python train.py --resume runs/X/best.pt --eval-only          # evaluate a checkpoint, per-sample CSV
    torchrun --nproc-per-node 4 train.py --dataset ks --data-root /data/ks   # several GPUs, same method

Each run writes into its directory (--out): args.json, log.jsonl (one JSON object per epoch),
contributions/epoch_NNN.npz (phi of every valued sample), best.pt, last.pt and results.json.

Where things are: this file holds the command line, the run's set-up, the epoch loop, checkpoints and logs;
engine.py the training epoch and the one evaluation pass (and the plumbing of several processes); method.py the
registry of modes (METHODS) and the paper's method (Algorithms 1 and 2 in their order, with their line numbers);
comparators.py the compared methods. Every mode is a registered Method class: --mode picks it, its own flags are
its argparse group, and nothing here compares the mode with a name. Each epoch, train() asks the method for the
epoch's plan (phase, valuation, uni-modal copies), builds D^rs from the copies (data.ResampledDataset, served in
data.TrainingBatches), trains one epoch through the method's loss and gradient hook (engine.train_one_epoch),
validates, logs and saves a checkpoint.
"""
import argparse
import contextlib
import csv
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import comparators
import data
import engine
import models
import plot
import shapley_mm
from engine import TrainingError
from method import METHODS, Method, OfflineValuation, OnlineValuation

MODES = tuple(METHODS)  # method.py's and comparators.py's modes, in --help's order (a script may register more)
RESAMPLING_MODES = tuple(name for name, cls in METHODS.items() if cls.resamples)  # the paper's (Alg. 1, 2, Table 4)
AV_DATASETS = ("ks", "mmdebiased", "ucf101", "cremad")

# The defaults of each data set, which --help shows for the --dataset given. The audio-visual ones follow the
# paper (Sec. 4.1: SGD, momentum 0.9, lr 1e-3, batch 64, warm-up 5; UCF-101 from ImageNet weights); the authors'
# code instead defaults to Adam, lr 5e-5, weight decay 1e-4, StepLR(30, 0.1), 60 epochs. mfeat and synthetic are
# sized for a CPU. Loader workers: 4, or as many as the machine has cores if fewer.
AUDIO_VISUAL = dict(epochs=60, warmup=5, batch_size=64, optimizer="sgd", lr=1e-3, weight_decay=1e-4, lr_step=30,
                    workers=min(4, len(os.sched_getaffinity(0))), pretrained=False)
PRESETS = {
    "ks": AUDIO_VISUAL,
    "mmdebiased": AUDIO_VISUAL,
    "cremad": AUDIO_VISUAL,
    "ucf101": dict(AUDIO_VISUAL, pretrained=True),
    "mfeat": dict(epochs=40, warmup=5, batch_size=64, optimizer="sgd", lr=1e-2, weight_decay=1e-4, lr_step=30,
                  workers=0, pretrained=False),
    "synthetic": dict(epochs=6, warmup=2, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=0.0, lr_step=0,
                      workers=0, pretrained=False),
}
# Flags a resumed run (--resume) or an evaluation (--eval-only) may change; every other setting comes from the
# checkpoint, and a flag given that disagrees with it is an error. RUN_CONTROL flags say what to do, not how.
RESUME_OVERRIDES = ("epochs", "gpu", "workers", "data_root", "split_file", "list_dir")
EVAL_OVERRIDES = ("gpu", "workers", "data_root", "split_file", "list_dir")
RUN_CONTROL = ("resume", "eval_only", "eval_split", "overwrite", "out")


# ----------------------------------------------------------------------------------------------
# the command line


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the flag and what was expected), exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def number(kind, low, high=None, low_open=False):
    """An argparse type: `kind` (int or float) in [low, high], or (low, high] with low_open."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        if value < low or (low_open and value == low) or (high is not None and value > high):
            bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"expected a value {bounds}, got {text}")
        return value
    return parse


def folder_name(text):
    """--out: a folder name; an empty one (an unset shell variable) would write the run into the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder name, got an empty string")
    return text


def view_list(text):
    """--views: mfeat view names, comma-separated, each once."""
    views = [v for v in text.split(",") if v]
    unknown = [v for v in views if v not in data.MFEAT_VIEWS]
    if unknown or not views:
        raise argparse.ArgumentTypeError(f"unknown view {', '.join(unknown) or repr(text)}; "
                                         f"choose from {','.join(data.MFEAT_VIEWS)}")
    if len(set(views)) != len(views):
        raise argparse.ArgumentTypeError(f"{text}: each view may be named once")
    return views


def get_args_parser(dataset="mfeat", add_help=True):
    """The flags of train.py, with the defaults of `dataset` (PRESETS)."""
    p = OneLineParser(
        description="Multimodal training with sample-level modality valuation (Wei et al., CVPR 2024). The defaults "
                    f"shown are those of --dataset {dataset}; `python train.py --dataset ks --help` shows another "
                    "data set's.", add_help=add_help)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="mfeat", choices=data.DATASETS,
                   help="mfeat: bundled UCI Multiple Features digits (no download); ks: Kinetics-Sounds; "
                        "mmdebiased: MM-Debiased; ucf101: UCF-101 RGB + optical flow; cremad: CREMA-D; synthetic: generated in "
                        "memory"
                        " (default: %(default)s)")
    g.add_argument("--data-root", help="root folder of ks / mmdebiased / ucf101 / cremad (see README for layouts)")
    g.add_argument("--split-file", help="mmdebiased: the JSON split file (default: DATA_ROOT/MM-Debiased.json)")
    g.add_argument("--list-dir", help="ks: a folder of OGM-GE style 'id,10,label' lists (my_train.txt, my_test.txt, "
                                      "my_val.txt) instead of the authors' ks_audio/*_1fps_path.txt")
    g.add_argument("--views", type=view_list, default=list(data.MFEAT_DEFAULT_VIEWS),
                   help=f"mfeat views to use, comma-separated, in order (from {','.join(data.MFEAT_VIEWS)}); "
                        "the default pairs a strong view with a weak one (default: pix,mor)")
    g.add_argument("--mfeat-degrade", type=number(float, 0.0, 1.0), default=0.0,
                   help="mfeat: blend one random view of every sample with noise of strength U(0, this), giving "
                        "sample-level imbalance at dataset-level balance (like MM-Debiased) (default: %(default)s)")
    g.add_argument("--mfeat-weak-signal", type=number(float, 0.0, 1.0), default=0.0,
                   help="mfeat: the sample-level benchmark: in every sample one view (each view in half the samples of "
                        "every class, with two views) keeps only this share of its signal, x <- s x + sqrt(1 - s^2) "
                        "noise, the noise drawn anew each time a training sample is read; use with --views fac,pix "
                        "(data.MfeatWeakViewDataset; 0: off) (default: %(default)s)")
    g.add_argument("--mfeat-strong-signal", type=number(float, 0.0, 1.0, low_open=True), default=1.0,
                   help="mfeat, with --mfeat-weak-signal: the share of its signal every other view keeps, weakened "
                        "alike (1: untouched; equal to --mfeat-weak-signal: every view weakened alike) "
                        "(default: %(default)s)")
    g.add_argument("--mfeat-test-fraction", type=number(float, 0.0, 0.7, low_open=True),
                   default=data.MFEAT_FRACTIONS[2],
                   help="mfeat: the share of every class in the test split, taken from train (validation keeps "
                        f"{data.MFEAT_FRACTIONS[1]:g}) (default: %(default)s)")
    g.add_argument("--split-seed", type=number(int, 0), default=data.MFEAT_SPLIT_SEED,
                   help="mfeat: seed of the stratified train / val / test split and of the degradation draws "
                        "(default: %(default)s)")
    g.add_argument("--image-size", type=number(int, 8), default=224, help="frame / image side of the video data sets (default: %(default)s)")
    g.add_argument("--synthetic-modalities", type=number(int, 1), default=2, help="synthetic: number of modalities (default: %(default)s)")
    g.add_argument("--synthetic-samples", type=number(int, 3), default=600,
                   help="synthetic: training samples (val, test: a third) (default: %(default)s)")
    g.add_argument("--synthetic-size", type=number(int, 8), default=32, help="synthetic: image side in pixels (default: %(default)s)")
    g.add_argument("--synthetic-discrepancy", type=number(float, 0.0, 1.0), default=0.5,
                   help="synthetic: fraction of samples whose class only one modality carries (default: %(default)s)")
    g.add_argument("--skip-missing", action="store_true",
                   help="skip listed clips whose files are missing (counted and listed at start-up) instead of failing")
    g = p.add_argument_group("method")
    g.add_argument("--mode", default="sample", choices=tuple(METHODS),
                   help="; ".join(f"{name}: {cls.about}" for name, cls in METHODS.items()) + " (default: %(default)s)")
    g.add_argument("--fusion", default="concat", choices=models.FUSIONS, help="fusion design (concat is the paper's) (default: %(default)s)")
    for size, about in (("layers", "transformer layers"), ("width", "token width"), ("heads", "attention heads"),
                        ("fusion-layer", "first layer that fuses (layers: none)"),
                        ("bottlenecks", "bottleneck tokens"), ("patch", "patch side in pixels of images and frames")):
        key = size.replace("-", "_")
        g.add_argument(f"--mbt-{size}", type=number(int, 0), default=models.MBT_DEFAULTS[key],
                       help=f"--fusion mbt: {about} (default: %(default)s; the paper's: {models.MBT_PAPER[key]})")
    g.add_argument("--mask", choices=("feature", "input"),
                   help="how a modality is removed: zero its encoder feature (the authors' code) or its input (the "
                        "paper's text); default: the fusion's own, feature for late fusion, input for fusions that "
                        "mix modalities inside the network")
    g.add_argument("--warmup", type=number(int, 0), help="epochs of plain joint training before the first valuation (default: %(default)s)")
    g.add_argument("--valuation", default="offline", choices=("offline", "online"),
                   help="offline: value the training set before each epoch in eval mode (the paper); online: take "
                        "each sample's coalition predictions from the training step that holds it (late fusion with "
                        "feature masking only) and plan the next epoch from them (default: %(default)s)")
    g.add_argument("--track-phi", action="store_true",
                   help="also value the training set in warm-up epochs and in the modes that do not re-sample, to "
                        "log contributions")
    for cls, modes in method_flag_groups():
        cls.add_arguments(p.add_argument_group(f"--mode {', '.join(modes)}"), number)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=number(int, 1), help="total epochs, warm-up included (default: %(default)s)")
    g.add_argument("--batch-size", type=number(int, 1), help="samples per batch (default: %(default)s)")
    g.add_argument("--optimizer", choices=("sgd", "adam"), help="(default: %(default)s)")
    g.add_argument("--lr", type=number(float, 0.0, low_open=True), help="learning rate (default: %(default)s)")
    g.add_argument("--momentum", type=number(float, 0.0, 1.0), default=0.9, help="SGD momentum (default: %(default)s)")
    g.add_argument("--weight-decay", type=number(float, 0.0), help="(default: %(default)s)")
    g.add_argument("--lr-step", type=number(int, 0), help="StepLR period in epochs; 0 keeps the lr constant (default: %(default)s)")
    g.add_argument("--lr-gamma", type=number(float, 0.0, 1.0, low_open=True), default=0.1, help="StepLR factor (default: %(default)s)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction,
                   help="start ResNet-18 encoders from torchvision's ImageNet weights (default: %(default)s)")
    g.add_argument("--weights", metavar="FILE",
                   help="with --pretrained: torchvision's ImageNet ResNet-18 file (resnet18-f37072fd.pth), "
                        "downloaded beforehand; its SHA-256 is checked (default: the torch hub cache or a download)")
    g.add_argument("--amp", action="store_true", help="mixed precision on GPU (no-op on CPU)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights, the shuffling and the re-sampling draws (default: %(default)s)")
    g.add_argument("--gpu", type=number(int, -1),
                   help="GPU index; -1 for the CPU; default: the first GPU if any (under torchrun: LOCAL_RANK's GPU)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the batches of all processes (needs "
                        "--mask input or a fusion that runs every encoder on every row)")
    g.add_argument("--workers", type=number(int, 0), help="DataLoader worker processes (default: %(default)s)")
    g.add_argument("--out", type=folder_name,
                   help="run directory (default runs/<dataset>-<mode>-s<seed>-<time>); with --eval-only, the folder of "
                        "its CSV and JSON (default: the checkpoint's)")
    g.add_argument("--overwrite", action="store_true", help="write into an existing run directory, replacing it")
    g.add_argument("--resume", metavar="CHECKPOINT",
                   help="a checkpoint (RUN_DIR/last.pt or best.pt): continue that run in its own directory "
                        "(--epochs may extend it), or with --eval-only evaluate it")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate --resume CHECKPOINT on --eval-split and write a CSV of per-sample valuation")
    g.add_argument("--eval-split", default="test", choices=("train", "val", "test"), help="split for --eval-only (default: %(default)s)")
    p.set_defaults(**PRESETS[dataset])
    return p


def parse_args(argv=None):
    """The flags with the defaults of the data set they name, and the names of the flags given on the command line
    (a resumed run checks those against its checkpoint)."""
    dataset = get_args_parser(add_help=False).parse_known_args(argv)[0].dataset
    parser = get_args_parser(dataset)
    args = parser.parse_args(argv)
    unset = object()
    probe = argparse.Namespace(**{key: unset for key in vars(args)})  # argparse fills only what was given
    parser.parse_args(argv, namespace=probe)
    return args, [key for key, value in vars(probe).items() if value is not unset]


def make_args(**settings):
    """The settings of a run as the command line would give them, for scripts: the defaults of
    settings["dataset"], then `settings` (flag names with underscores), checked as train.py checks its flags
    (scripts set whole configurations, so flags that do not apply are not refused here: FLAG_SCOPE)."""
    args = get_args_parser(settings.get("dataset", "mfeat")).parse_args([])
    unknown = set(settings) - set(vars(args))
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    vars(args).update(settings)
    return check_args(args)


def flag_name(key):
    return "--" + key.replace("_", "-")


def method_flag_groups():
    """(class, the modes it serves) for each class of the registry's hierarchies that declares flags of its own
    (Method.add_arguments): a class's flags act in the modes of its subclasses."""
    declaring = []
    for cls in METHODS.values():
        for klass in reversed(cls.__mro__):
            if "add_arguments" in vars(klass) and klass is not Method and klass not in declaring:
                declaring.append(klass)
    return [(klass, [name for name, cls in METHODS.items() if issubclass(cls, klass)]) for klass in declaring]


def method_flag_scope():
    """FLAG_SCOPE's entries for the methods' own flags: each acts in the modes of the class that declares it."""
    scope = {}
    for klass, modes in method_flag_groups():
        group = argparse.ArgumentParser().add_argument_group()
        klass.add_arguments(group, number)
        for action in group._group_actions:  # the flags add_arguments declared
            scope[action.dest] = (lambda a, klass=klass: issubclass(METHODS[a.mode], klass), f"--mode {', '.join(modes)}")
    return scope


# Flags that act only in some runs, with where they act: one given on the command line where it would do nothing
# is refused (check_flags_apply), since a flag that is silently ignored misleads whoever reads the command. The
# methods' own flags join them (flag_scope). --warmup is not among them: one command line serves every mode, and
# --mode baseline is joint training throughout; --valuation online where nothing is planned from it is refused in
# check_online.
FLAG_SCOPE = {
    **{key: (lambda a: a.dataset == "mfeat", "--dataset mfeat")
       for key in ("views", "mfeat_degrade", "mfeat_weak_signal", "mfeat_test_fraction", "split_seed")},
    "mfeat_strong_signal": (lambda a: a.dataset == "mfeat" and a.mfeat_weak_signal > 0, "--mfeat-weak-signal"),
    **{key: (lambda a: a.dataset == "synthetic", "--dataset synthetic")
       for key in ("synthetic_modalities", "synthetic_samples", "synthetic_size", "synthetic_discrepancy")},
    **{key: (lambda a: a.dataset in AV_DATASETS, f"--dataset {', '.join(AV_DATASETS)}")
       for key in ("data_root", "skip_missing", "image_size")},
    "split_file": (lambda a: a.dataset == "mmdebiased", "--dataset mmdebiased"),
    "list_dir": (lambda a: a.dataset == "ks", "--dataset ks"),
    **{f"mbt_{key}": (lambda a: a.fusion == "mbt", "--fusion mbt") for key in models.MBT_DEFAULTS},
    "momentum": (lambda a: a.optimizer == "sgd", "--optimizer sgd"),
    "lr_gamma": (lambda a: a.lr_step > 0, "--lr-step > 0"),
    "pretrained": (lambda a: a.dataset != "mfeat", "the ResNet encoders (mfeat's views go to MLPs)"),
    "eval_split": (lambda a: a.eval_only, "--eval-only"),
    "overwrite": (lambda a: not a.resume, "a new run (a resumed run continues its own folder)"),
    "out": (lambda a: not a.resume or a.eval_only, "a new run or --eval-only (a resumed run continues its own folder)"),
    "valuation": (lambda a: a.valuation == "online" or METHODS[a.mode].resamples or a.track_phi,  # online: check_online
                  f"--mode {', '.join(RESAMPLING_MODES)} or --track-phi"),
    "amp": (lambda a: a.gpu != -1 and torch.cuda.is_available(), "a GPU (this run is on the CPU)"),
}


def flag_scope():
    """The one table of where each flag acts: FLAG_SCOPE and the registered methods' own flags."""
    return {**FLAG_SCOPE, **method_flag_scope()}


def check_flags_apply(args, given):
    """Refuse, in one line, a flag given on the command line that has no effect in this run (for a resumed or
    evaluated run, `args` are the checkpoint's settings with the flags given now)."""
    scope = flag_scope()
    for key in given:
        applies, where = scope.get(key, (None, None))
        if applies is not None and not applies(args):
            raise TrainingError(f"{flag_name(key)} has no effect in this run: it acts with {where} only")


def check_args(args):
    """Refuse combinations of flags no run can use, in one line, before anything is written."""
    allowed = models.allowed_masks(args.fusion)  # the fusion's default first
    args.mask = args.mask or allowed[0]
    if args.mask not in allowed:
        raise TrainingError(f"--mask {args.mask} is not defined for --fusion {args.fusion}, which mixes the modalities "
                            f"inside the network; use --mask {' or '.join(allowed)} (zero the absent input)")
    if args.fusion == "mbt":
        try:
            models.check_mbt(**mbt_sizes(args), pretrained=args.pretrained,
                             name=lambda key: "--pretrained (off: --no-pretrained)" if key == "pretrained"
                             else flag_name("mbt_" + key))
        except ValueError as error:
            raise TrainingError(f"--fusion mbt: {error}")
    num_modalities = {"mfeat": len(args.views), "synthetic": args.synthetic_modalities}.get(args.dataset, 2)
    refusal = METHODS[args.mode].refusal(args, num_modalities)
    if refusal:
        raise TrainingError(refusal)
    if args.valuation == "online":
        check_online(args)
    if args.dataset in AV_DATASETS and args.data_root is None:
        raise TrainingError(f"--dataset {args.dataset} needs --data-root (the folder holding its clips)")
    if args.mfeat_weak_signal > 0 and (args.mfeat_degrade > 0 or len(args.views) < 2 or args.mfeat_weak_signal >= 1):
        raise TrainingError("--mfeat-weak-signal needs two or more --views, a value below 1 and no --mfeat-degrade")
    if args.mfeat_weak_signal > 0 and args.mfeat_strong_signal < args.mfeat_weak_signal:
        raise TrainingError(f"--mfeat-strong-signal {args.mfeat_strong_signal} is below --mfeat-weak-signal "
                            f"{args.mfeat_weak_signal}: the strong views keep at least the weak view's share")
    if args.weights is not None and not args.pretrained:
        raise TrainingError("--weights FILE is the ImageNet file of --pretrained; add --pretrained or drop --weights")
    if METHODS[args.mode].uses_warmup and args.warmup >= args.epochs:
        engine.warn(f"--warmup {args.warmup} is not smaller than --epochs {args.epochs}: mode '{args.mode}' never "
                    f"leaves its warm-up (no re-sampling, no compared method)")
    if args.data_root is not None:
        args.data_root = os.path.abspath(args.data_root)  # args.json serves evaluations run from other folders
    return args


def check_online(args):
    """--valuation online reuses the pooled features of the training step, which only late fusion with feature
    masking has: refuse it in one line elsewhere, and without a warm-up epoch to plan the first epoch from."""
    cls = METHODS[args.mode]
    if cls.loss is not Method.loss:  # the base's loss records online valuation; a method's own loss does not
        resampling = ", ".join(name for name, c in METHODS.items() if c.resamples)
        raise TrainingError(f"--valuation online plans the re-sampled epochs of --mode {resampling}; "
                            f"--mode {args.mode} plans none and values only for the log (--track-phi), offline")
    if models.classifier_kind(args.fusion) is not models.LateFusionClassifier:
        raise TrainingError(f"--valuation online reuses the features of the training step, and --fusion "
                            f"{args.fusion} mixes the modalities inside the network (no feature of its own per "
                            f"modality); use --valuation offline")
    if args.mask != "feature":
        raise TrainingError("--valuation online needs --mask feature: with --mask input a training step encodes "
                            "zeroed inputs with the batch's statistics, not the features a coalition would see; "
                            "use --valuation offline")
    if cls.resamples and args.warmup < 1:
        raise TrainingError("--valuation online plans each epoch from the previous epoch's training, and --warmup 0 "
                            "leaves epoch 0 without one; use --warmup 1 or more, or --valuation offline")
    if not cls.resamples and not args.track_phi:
        raise TrainingError(f"--valuation online does nothing in --mode {args.mode} without --track-phi")


# ----------------------------------------------------------------------------------------------
# what a run is made of: device, data, model, optimiser


def build_datasets(args):
    """train (training transforms), train_eval (the same samples, evaluation transforms), val, test."""
    options = dict(root=args.data_root, split_file=args.split_file, list_dir=args.list_dir,
                   skip_missing=args.skip_missing, seed=args.seed)
    if args.dataset == "mfeat":
        options.update(views=tuple(args.views), degrade=args.mfeat_degrade, weak_signal=args.mfeat_weak_signal,
                       strong_signal=args.mfeat_strong_signal, split_seed=args.split_seed,
                       test_fraction=args.mfeat_test_fraction)
    elif args.dataset == "synthetic":
        options.update(num_modalities=args.synthetic_modalities, size=args.synthetic_size,
                       sample_discrepancy=args.synthetic_discrepancy, train_size=args.synthetic_samples,
                       val_size=args.synthetic_samples // 3, test_size=args.synthetic_samples // 3)
    else:
        options["image_size"] = args.image_size
    splits = data.build_splits(args.dataset, **options)
    for split, dataset in splits.items():
        if split != "train_eval" and dataset.skipped:
            shown = ", ".join(f"{sample_id} ({reason})" for sample_id, reason in dataset.skipped[:5])
            more = f" and {len(dataset.skipped) - 5} more" if len(dataset.skipped) > 5 else ""
            print(f"skipped {len(dataset.skipped)} {split} clips with missing files: {shown}{more}")
    return splits


def check_inputs_fit(args, dataset):
    """Refuse, before anything is written, inputs the model cannot take: MBT's positional embeddings cover at most
    models.MAX_POSITIONS patches per axis and frames per clip (the first training sample's sizes)."""
    if args.fusion != "mbt":
        return
    for (kind, _), x in zip(dataset.input_specs, dataset[0][0]):
        try:
            models.check_mbt_input(kind, x.shape, args.mbt_patch)
        except ValueError as error:
            raise TrainingError(f"--fusion mbt: {error}")


def mbt_sizes(args):
    """MBT's sizes from the --mbt-* flags (models.MBT_DEFAULTS' keys); None unless --fusion mbt."""
    return {key: getattr(args, f"mbt_{key}") for key in models.MBT_DEFAULTS} if args.fusion == "mbt" else None


def model_config(args, dataset):
    """What a checkpoint must agree with to be loaded into this run."""
    config = dict(dataset=args.dataset, views=args.views if args.dataset == "mfeat" else None,
                  modalities=list(dataset.modalities), input_specs=[list(s) for s in dataset.input_specs],
                  num_classes=dataset.num_classes, fusion=args.fusion, mask=args.mask)
    if args.fusion == "mbt":
        config["mbt"] = mbt_sizes(args)
    return config


def build_model(args, dataset):
    """The classifier of the run; with --pretrained, ResNet encoders start from ImageNet weights (--weights FILE, or
    torch hub's copy). A weights file that is missing or is not torchvision's stops the run in one line."""
    try:
        return models.build_model(dataset.input_specs, dataset.num_classes, fusion=args.fusion, mask_mode=args.mask,
                                  pretrained=(args.weights or args.pretrained), mbt=mbt_sizes(args))
    except (RuntimeError, ValueError) as error:
        raise TrainingError(f"{'--weights' if args.weights else '--pretrained'}: {error}")


def build_optimizer(args, model):
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step = args.lr_step if args.lr_step > 0 else 2 ** 62  # 0: never decays (whatever --epochs a resume sets)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=args.lr_gamma)
    return optimizer, scheduler


def loader_settings(args, device):
    return dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")


# ----------------------------------------------------------------------------------------------
# files: every write is atomic, so a run killed at any moment leaves the previous files intact


_holding_ctrl_c = threading.Event()  # set while a ctrl_c_held_back block runs


@contextlib.contextmanager
def ctrl_c_held_back():
    """Ctrl-C during the block takes effect at its end (as KeyboardInterrupt): a file being written is finished
    first, since torch.save interrupted inside its C++ writer fails with a RuntimeError, not KeyboardInterrupt.
    Only the main thread can handle signals; elsewhere, and inside an outer such block, the block runs as is."""
    if threading.current_thread() is not threading.main_thread() or _holding_ctrl_c.is_set():
        yield
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    _holding_ctrl_c.set()
    try:
        yield
    finally:
        _holding_ctrl_c.clear()
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def replace_atomic(path, make):
    """Call make(tmp) to create a temporary file beside `path`, then rename it over `path`; a make that fails (a
    full disk) removes the temporary file and leaves `path` as it was, and Ctrl-C waits for the rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with ctrl_c_held_back():
        try:
            make(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def write_atomic(path, write_bytes):
    """Call write_bytes(file) on a temporary file, synced to disk, then rename it over `path` (replace_atomic)."""
    def make(tmp):
        with open(tmp, "wb") as f:
            write_bytes(f)
            f.flush()
            os.fsync(f.fileno())
    replace_atomic(path, make)


def save_json(path, obj):
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_log(path, records):
    write_atomic(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))


def save_checkpoint(path, state):
    write_atomic(path, lambda f: torch.save(state, f))


def save_copy(source, path):
    """`path` holding the bytes of `source`, replaced atomically: a hard link where the file system has them (no
    byte written twice; `source` replaced later by a rename leaves `path` as it was), a copy where it has not."""
    def make(tmp):
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    replace_atomic(path, make)


def load_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_contributions(out, epoch, dataset, valued, phi, valuation="offline"):
    """contributions/epoch_NNN.npz: the contributions that planned epoch NNN, and which valuation took them."""
    ids = np.array([dataset.sample_ids[i] for i in valued.tolist()])

    def write(f):
        buffer = io.BytesIO()
        np.savez_compressed(buffer, ids=ids, index=valued.numpy(), phi=phi.numpy(),
                            modalities=np.array(dataset.modalities), valuation=np.array(valuation))
        f.write(buffer.getvalue())

    write_atomic(os.path.join(out, "contributions", f"epoch_{epoch:03d}.npz"), write)


RUN_FILES = ("args.json", "log.jsonl", "last.pt", "best.pt", "results.json")


def check_writable(out, flag="--out"):
    """Refuse, before any work, an output folder (given by `flag`) that is a file or lies where nothing can be
    written."""
    existing = out
    while not os.path.exists(existing):
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing):
        raise TrainingError(f"{flag} {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainingError(f"{flag} {out}: {existing} is not writable")


def prepare_run_dir(out, overwrite):
    """Create the run directory; refuse to write into one that already holds a run unless told to
    overwrite it, and then remove the old run's files first, so that none of them outlives it."""
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if existing and not overwrite:
        raise TrainingError(f"run directory {out} already holds a run ({', '.join(existing)}); "
                            f"pass --resume {os.path.join(out, 'last.pt')} to continue it or --overwrite to replace it")
    for name in existing:
        os.remove(os.path.join(out, name))
    contributions = os.path.join(out, "contributions")
    if os.path.isdir(contributions):
        for name in os.listdir(contributions):
            if name.startswith("epoch_") and name.endswith(".npz"):
                os.remove(os.path.join(contributions, name))
    os.makedirs(contributions, exist_ok=True)


# ----------------------------------------------------------------------------------------------
# checkpoints


def rng_state(generator):
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                 generator=generator.get_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What a checkpoint may hold beside tensors, numbers, strings, lists and dicts: NumPy's random state (an array).
# Anything else is refused unread: unpickling it could run code, and a checkpoint is a file others pass around.
_NUMPY_RECONSTRUCT = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
CHECKPOINT_GLOBALS = [(_NUMPY_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
                      (_NUMPY_RECONSTRUCT, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype,
                      type(np.dtype(np.uint32))]
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "method", "epoch", "best", "rng", "log", "args",
                   "model_config")


def load_checkpoint(path):
    """A checkpoint written by train.py, read without running any code it may hold (torch.load weights_only), or a
    TrainingError that says why not."""
    if not os.path.isfile(path):
        raise TrainingError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # code it would run, or a truncated or foreign file
        allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in CHECKPOINT_GLOBALS}
        try:
            unsafe = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)  # read, not run
                      if name not in allowed]
        except Exception:
            unsafe = []
        if unsafe:
            raise TrainingError(f"checkpoint {path} holds objects train.py never writes ({', '.join(unsafe)}): "
                                f"refused unread, since loading them could run code")
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TrainingError(f"checkpoint {path} could not be read ({error.__class__.__name__}: {reason})")
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise TrainingError(f"checkpoint {path} was not written by train.py (no model_config)")
    return upgrade_checkpoint(checkpoint, path)


def check_config(checkpoint, config, path):
    """Refuse a checkpoint made for another data set, class count or model, naming what differs."""
    saved = checkpoint["model_config"]
    if saved != config:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {config[k]!r}"
                            for k in config if saved.get(k) != config[k])
        raise TrainingError(f"checkpoint {path} does not match this run ({details})")


def upgrade_checkpoint(checkpoint, path):
    """The checkpoint with a default for every setting it lacks (a flag added after it was written); one that lacks
    a part today's train.py needs, holds a setting of another type than its flag's, or names a mode no script
    registered is refused in one line."""
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    incompatible = f"checkpoint {path} comes from an incompatible version of train.py"
    if missing or not isinstance(checkpoint["args"], dict) or checkpoint["args"].get("dataset") not in data.DATASETS:
        raise TrainingError(f"{incompatible} ({'no ' + ', '.join(missing) if missing else 'unknown settings'}); "
                            f"use the version that wrote it")
    defaults = vars(get_args_parser(checkpoint["args"]["dataset"]).parse_args([]))
    for key, value in checkpoint["args"].items():
        expected = defaults.get(key)
        if None not in (expected, value) and type(value) is not type(expected) and not (
                isinstance(expected, float) and type(value) is int):
            raise TrainingError(f"{incompatible} (setting {key} is {value!r}, today a {type(expected).__name__}); "
                                f"use the version that wrote it")
    if checkpoint["args"].get("mode") not in METHODS:
        raise TrainingError(f"checkpoint {path} was trained with --mode {checkpoint['args'].get('mode')}, which no "
                            f"registered method provides (modes: {', '.join(METHODS)})")
    checkpoint["args"] = {**defaults, **checkpoint["args"]}
    return checkpoint


def checkpoint_args(checkpoint, args, given, changeable):
    """The settings `checkpoint` was trained with. Flags given now that are in `changeable` replace them;
    any other flag given now must agree with them, and each must act in the run they describe."""
    saved = dict(checkpoint["args"])
    for key in given:
        if key in changeable:
            saved[key] = getattr(args, key)
        elif key not in RUN_CONTROL and saved.get(key) != getattr(args, key):
            allowed = ", ".join("--" + k.replace("_", "-") for k in changeable)
            raise TrainingError(f"--{key.replace('_', '-')} {getattr(args, key)!r} differs from the checkpoint's "
                                f"{saved.get(key)!r}: a checkpoint keeps its settings (only {allowed} may change)")
    if saved["data_root"] is not None:
        saved["data_root"] = os.path.abspath(saved["data_root"])
    if given:  # a script's call (args None) gives none
        check_flags_apply(argparse.Namespace(**dict(saved, **{key: getattr(args, key) for key in RUN_CONTROL})), given)
    return argparse.Namespace(**saved)


def format_epoch(record, modalities):
    def per_modality(values, scale=1, fmt="{:.1f}"):
        return " ".join(f"{m} {fmt.format(v * scale)}" for m, v in zip(modalities, values))

    line = (f"epoch {record['epoch']:3d} {record['phase']:>8} | loss {record['train_loss']:.3f} "
            f"| samples {record['train_samples']}")
    if any(record["copies"]):
        line += f" (copies: {per_modality(record['copies'], fmt='{:d}')})"
    if record["mean_phi"] is not None:
        taken = " (online)" if record.get("valuation") == "online" else ""
        line += f" | phi{taken} {per_modality(record['mean_phi'], fmt='{:.2f}')}"
    line += (f" | val acc {100 * record['val_acc']:.1f} map {100 * record['val_map']:.1f} "
             f"| alone {per_modality(record['val_acc_per_modality'], 100)} | {record['seconds']:.1f}s")
    return line


def resumed(args, given):
    """--resume: (the checkpoint, its settings with the given RESUME_OVERRIDES, in its own directory), or
    (None, args) when the run has no epoch left to train."""
    checkpoint = load_checkpoint(args.resume)
    path = args.resume
    args = checkpoint_args(checkpoint, args, given, RESUME_OVERRIDES)
    args.resume, args.out = path, os.path.dirname(os.path.abspath(path))
    if checkpoint["epoch"] + 1 >= args.epochs:
        print(f"nothing left to train: {path} holds epoch {checkpoint['epoch']} of a run of {args.epochs} "
              f"epochs; pass --epochs N to extend it (files left as they are)")
        return None, args
    return checkpoint, args


def build_method(args, model, splits, loader_kwargs, device, generator):
    """The Method of --mode (method.METHODS), with what values the training samples where it re-samples or
    --track-phi logs phi: offline, a pass before each epoch; online, the training steps."""
    cls, valuation = METHODS[args.mode], None
    if cls.resamples or args.track_phi:
        valuation = (OnlineValuation(len(splits["train"]), model.num_modalities) if args.valuation == "online"
                     else OfflineValuation(splits["train_eval"], loader_kwargs, device, args.amp))
    return cls.build(args, model, splits, loader_kwargs, device, generator, valuation)


def training_step(args, model, method, device):
    """What each training step calls: the model with the method's loss (engine.TrainingStep), under torchrun inside
    DistributedDataParallel (with --sync-bn, BatchNorm over every process's batch)."""
    if args.sync_bn and (device.type != "cuda" or not dist.is_initialized() or args.mask == "feature"):
        raise TrainingError("--sync-bn needs torchrun with GPUs and --mask input (with feature masking an encoder "
                            "skips the batches that hold none of its modality, and the processes would wait)")
    step = engine.TrainingStep(model, method)
    if not dist.is_initialized():
        return step
    if args.sync_bn:
        step = torch.nn.SyncBatchNorm.convert_sync_batchnorm(step)
    # with feature masking an encoder skips a batch that holds none of its modality: its weights get no gradient.
    # Inputs stay where the step puts them (no device_ids): a sample's index stays on the CPU with the online table.
    return DistributedDataParallel(step, find_unused_parameters=args.mask == "feature" or method.some_parameters_idle)


def epoch_loader(train_set, copies, args, generator, device):
    """D^rs (Alg. 1 line 10, Alg. 2 line 12: the training set and the plan's uni-modal copies, copies [N, n] or None
    for none) in batches where no encoder sees a lone sample; under torchrun each process trains on its share."""
    if copies is None:
        copies = torch.zeros(len(train_set), len(train_set.modalities), dtype=torch.long)
    epoch_set = data.ResampledDataset(train_set, *shapley_mm.expand_copies(copies))
    batches = data.TrainingBatches(epoch_set, args.batch_size, generator, *engine.world())
    return DataLoader(epoch_set, batch_sampler=batches, generator=generator, num_workers=args.workers,
                      pin_memory=device.type == "cuda"), copies


def check_finite_weights(model, epoch):
    """Stop before a model whose weights an update made infinite or NaN is validated or saved."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        kept = f"last.pt holds epoch {epoch - 1}, the last good one" if epoch > 0 else "no checkpoint was written"
        raise TrainingError(f"non-finite weights after the updates of epoch {epoch}: stopped; {kept}")


def evaluate_best(model, splits, out, loader_kwargs, device, args, log):
    """Test the checkpoint chosen on validation, read once (rank 0's file, sent to every process); results.json."""
    best_state = engine.broadcast(load_checkpoint(os.path.join(out, "best.pt")) if engine.is_main_process() else None)
    model.load_state_dict(best_state["model"])
    test_pass = engine.valuation_pass(model, splits["test"], loader_kwargs, device, args.amp)
    test = engine.metrics(test_pass)
    test_phi = shapley_mm.shapley_values(shapley_mm.benefit(test_pass["correct"]))  # Eq. 1-3
    names = splits["train"].modalities
    results = dict(best_epoch=best_state["epoch"], val_acc=best_state["best"]["val_acc"],
                   test_acc=test["acc"], test_map=test["map"], test_acc_per_modality=test["acc_per_modality"],
                   test_mean_phi=test_phi.mean(0).tolist(), modalities=list(names),
                   train_seconds=sum(r["seconds"] for r in log))
    if engine.is_main_process():
        save_json(os.path.join(out, "results.json"), results)
        plot.draw_run(out)  # the run's last file: training.png, from the whole log (a resumed run's too)
    print(f"best epoch {results['best_epoch']} (val acc {100 * results['val_acc']:.2f})")
    print(f"test acc {100 * test['acc']:.2f}  mAP {100 * test['map']:.2f}")
    print("test acc per modality: " + ", ".join(f"{m} {100 * a:.2f}" for m, a in zip(names, test["acc_per_modality"])))
    print("mean contribution on test: " + ", ".join(f"{m} {p:.3f}" for m, p in zip(names, results["test_mean_phi"])))
    return results


def start_line(args, splits, device):
    train_set = splits["train"]
    classes = f"{train_set.num_classes} classes"
    if train_set.classes_inferred_from:
        classes += f" (inferred from {train_set.classes_inferred_from})"
    online = ", online valuation" if args.valuation == "online" else ""
    return (f"{args.dataset}: {len(train_set)} train / {len(splits['val'])} val / {len(splits['test'])} test, "
            f"modalities {', '.join(train_set.modalities)}, {classes}; mode {args.mode}, fusion {args.fusion}, "
            f"{args.mask} masking{online}, device {device}; writing {args.out}")


def train(args, given=()):
    """Train as `args` say (Algorithms 1 and 2, or a compared method), then test the checkpoint chosen on
    validation."""
    resume = None
    if args.resume:  # the run goes on with its own settings, in its own directory
        resume, args = resumed(args, given)
        if resume is None:
            return None
    elif engine.is_main_process():
        check_writable(args.out)
    device = engine.setup_distributed(args.gpu)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)  # shuffling, Z, and the random re-sampling draws

    splits = build_datasets(args)
    train_set, out = splits["train"], args.out
    check_inputs_fit(args, train_set)
    config = model_config(args, train_set)
    model = build_model(args, train_set).to(device)
    optimizer, scheduler = build_optimizer(args, model)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    loader_kwargs = loader_settings(args, device)
    method = build_method(args, model, splits, loader_kwargs, device, generator)
    step = training_step(args, model, method, device)
    parts = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, method=method)
    if resume is not None:
        check_config(resume, config, args.resume)
        for name, part in parts.items():
            part.load_state_dict(resume[name])
        set_rng_state(resume["rng"], generator)
        start_epoch, best, log = resume["epoch"] + 1, resume["best"], resume["log"]  # the history travels with it
        print(f"resuming {out} after epoch {resume['epoch']}")
    else:
        if engine.is_main_process():
            prepare_run_dir(out, args.overwrite)
        start_epoch, best, log = 0, dict(val_acc=-1.0, epoch=-1), []
    if engine.is_main_process():
        save_json(os.path.join(out, "args.json"), vars(args))
        save_log(os.path.join(out, "log.jsonl"), log)
    print(start_line(args, splits, device))

    epoch, saved_epoch = start_epoch, start_epoch - 1
    try:
        for epoch in range(start_epoch, args.epochs):
            start = time.time()
            plan = method.plan(epoch, model)  # Alg. 1 lines 2-10, Alg. 2 lines 2-13
            if plan.phi is not None and engine.is_main_process():
                save_contributions(out, epoch, splits["train_eval"], plan.valued, plan.phi, args.valuation)
            valuation_seconds = time.time() - start if plan.phi is not None else 0.0
            loader, copies = epoch_loader(train_set, plan.copies, args, generator, device)
            lr = optimizer.param_groups[0]["lr"]
            train_loss, train_samples = engine.train_one_epoch(step, loader, optimizer, scaler, device, epoch,
                                                               args.amp)  # Alg. 1 line 12, Alg. 2 line 14
            method.end_epoch(epoch, model)
            scheduler.step()
            check_finite_weights(model, epoch)
            val = engine.metrics(engine.valuation_pass(model, splits["val"], loader_kwargs, device, args.amp))

            log.append(dict(epoch=epoch, phase=plan.phase, train_loss=train_loss, train_samples=train_samples,
                            copies=copies.sum(0).tolist(),
                            mean_phi=plan.phi.mean(0).tolist() if plan.phi is not None else None,
                            valued_samples=len(plan.valued) if plan.valued is not None else 0,
                            val_acc=val["acc"], val_map=val["map"], val_acc_per_modality=val["acc_per_modality"],
                            lr=lr, valuation_seconds=valuation_seconds, seconds=time.time() - start,
                            valuation=args.valuation, method=method.summary()))
            print(format_epoch(log[-1], train_set.modalities), flush=True)
            if val["acc"] > best["val_acc"]:  # chosen on validation, never on test
                best = dict(val_acc=val["acc"], epoch=epoch)
            state = dict({name: part.state_dict() for name, part in parts.items()}, epoch=epoch, best=best,
                         rng=rng_state(generator), log=log, args=vars(args), model_config=config,
                         plan=dict(valued_index=plan.valued, phi=plan.phi, copies=copies))
            with ctrl_c_held_back():  # the epoch's files are written whole, and saved_epoch says so
                if engine.is_main_process():
                    save_log(os.path.join(out, "log.jsonl"), log)
                    save_checkpoint(os.path.join(out, "last.pt"), state)
                    if best["epoch"] == epoch:  # the same checkpoint, written once
                        save_copy(os.path.join(out, "last.pt"), os.path.join(out, "best.pt"))
                saved_epoch = epoch
    except KeyboardInterrupt:
        last = os.path.join(out, "last.pt")
        kept = (f"{last} holds epoch {saved_epoch}; continue with: python train.py --resume {last}"
                if saved_epoch >= 0 else "no checkpoint was written")
        raise TrainingError(f"interrupted in epoch {epoch}: {kept}", code=130)
    return evaluate_best(model, splits, out, loader_kwargs, device, args, log)


def evaluate_checkpoint(path, split="test", args=None, given=(), confidence=False):
    """One pass of a saved model over `split`: (the pass, as engine.valuation_pass returns it, with phi [N, n] and the
    checkpoint's epoch added, and with `confidence` OGM-GE's per-sample confidence ogm_score [N, n], read in the same
    pass; the data set). Flags `given` in `args` may replace EVAL_OVERRIDES settings (another --data-root, say); any
    other given flag must agree with the checkpoint."""
    checkpoint = load_checkpoint(path)
    saved = checkpoint_args(checkpoint, args, given, EVAL_OVERRIDES)
    device = engine.setup_distributed(saved.gpu)
    splits = build_datasets(saved)
    dataset = splits["train_eval" if split == "train" else split]
    check_config(checkpoint, model_config(saved, dataset), path)
    model = build_model(saved, dataset).to(device)
    model.load_state_dict(checkpoint["model"])
    result = engine.valuation_pass(model, dataset, loader_settings(saved, device), device, saved.amp,
                                   also=comparators.read_confidence if confidence else None)  # Figure 4
    result["phi"] = shapley_mm.shapley_values(shapley_mm.benefit(result["correct"]))  # Eq. 1-3
    result["epoch"] = checkpoint["epoch"]
    return result, dataset


def eval_only(args, given=()):
    """Evaluate --resume CHECKPOINT on --eval-split and write a CSV of per-sample valuation beside it (or in --out),
    named after the split and the checkpoint (valuation_test_best.csv for best.pt), so that evaluating best.pt and
    last.pt keeps both."""
    if args.resume is None:
        raise TrainingError("--eval-only needs --resume CHECKPOINT (RUN_DIR/best.pt or last.pt)")
    out = args.out or os.path.dirname(os.path.abspath(args.resume))
    if engine.is_main_process():
        check_writable(out)
    result, dataset = evaluate_checkpoint(args.resume, args.eval_split, args, given, confidence=True)
    scores = engine.metrics(result)
    if engine.is_main_process():
        os.makedirs(out, exist_ok=True)
    name = f"{args.eval_split}_{os.path.splitext(os.path.basename(args.resume))[0]}"
    csv_path = os.path.join(out, f"valuation_{name}.csv")

    def write(f):
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["id", "label", "prediction"] + [f"phi_{m}" for m in dataset.modalities]
                        + [f"ogm_score_{m}" for m in dataset.modalities])
        for index, label, prediction, phi, score in zip(result["index"].tolist(), result["labels"].tolist(),
                                                        result["prediction"].tolist(), result["phi"].tolist(),
                                                        result["ogm_score"].tolist()):
            writer.writerow([dataset.sample_ids[index], label, prediction] + [f"{p:.4f}" for p in phi]
                            + [f"{s:.4f}" for s in score])
        f.write(text.getvalue().encode())

    if engine.is_main_process():
        write_atomic(csv_path, write)
        plot.draw_valuation(csv_path)  # the CSV's picture beside it (Figure 2c)
    results = dict(split=args.eval_split, checkpoint=os.path.abspath(args.resume), epoch=result["epoch"],
                   acc=scores["acc"], map=scores["map"], acc_per_modality=scores["acc_per_modality"],
                   mean_phi=result["phi"].mean(0).tolist(), modalities=list(dataset.modalities))
    if engine.is_main_process():
        save_json(os.path.join(out, f"eval_{name}.json"), results)
    print(f"{args.eval_split} acc {100 * scores['acc']:.2f}  mAP {100 * scores['map']:.2f}  per modality: "
          + ", ".join(f"{m} {100 * a:.2f}" for m, a in zip(dataset.modalities, scores["acc_per_modality"])))
    print(f"per-sample valuation written to {csv_path}")
    return results


def one_line(error):
    """The message of `error`; for one re-raised from a DataLoader worker, the original's last line."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def main(argv=None):
    args, given = parse_args(argv)
    try:
        engine.check_torchrun_environment()
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:  # under torchrun, rank 0 alone prints; errors still name the process they come from
        sys.stdout = open(os.devnull, "w")
        warnings.simplefilter("ignore")
    where = f"rank {rank}: " if engine.launched_by_torchrun() and "RANK" in os.environ else ""
    try:
        if args.resume is None:  # a resumed or evaluated run is checked with its checkpoint's settings
            check_flags_apply(args, given)
        if args.eval_only:
            return eval_only(args, given)
        if args.resume is None:
            args = check_args(args)
            if args.out is None:
                args.out = os.path.join("runs", f"{args.dataset}-{args.mode}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
        return train(args, given)
    except (TrainingError, data.DataError) as error:
        print(f"{where}error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(getattr(error, "code", 2))
    except OSError as error:  # a file that cannot be written or read: disk full, permissions
        print(f"{where}error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print(f"{where}error: interrupted before training started; nothing was trained", file=sys.stderr)
        raise SystemExit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

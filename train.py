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

How Algorithm 1 reads here: train() runs the epochs; for an epoch after the warm-up (line 2),
resampling_plan() values the samples (line 6, Eq. 1-3, through run_pass and shapley_mm) and
plan_copies() turns their contributions into uni-modal copies (lines 7-9, Eq. 10; Eq. 11 for
Algorithm 2; Table 4's ablations); data.ResampledDataset is D^rs, on which train_one_epoch()
updates the model (line 11).

--valuation online (late fusion with feature masking) moves line 6 into line 11: while epoch t trains,
value_online() takes each sample's coalition predictions from the features of the step that holds it
(the fusion head per coalition, without gradients), and resampling_plan() builds epoch t + 1's copies
from that table (online_table) instead of a separate pass.
"""
import argparse
import csv
import io
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

import comparators
import data
import models
import shapley_mm

RESAMPLING_MODES = ("sample", "modality", "naive", "reversed")  # the modes that value and re-sample (Alg. 1-2)
MODES = ("baseline",) + RESAMPLING_MODES + comparators.METHODS
AV_DATASETS = ("ks", "mmdebiased", "ucf101", "cremad")

# The defaults of each data set, which --help shows for the --dataset given. The audio-visual ones follow the
# paper (Sec. 4.1: SGD, momentum 0.9, lr 1e-3, batch 64, warm-up 5; UCF-101 from ImageNet weights); the authors'
# code instead defaults to Adam, lr 5e-5, weight decay 1e-4, StepLR(30, 0.1), 60 epochs. mfeat and synthetic are
# sized for a CPU.
AUDIO_VISUAL = dict(epochs=60, warmup=5, batch_size=64, optimizer="sgd", lr=1e-3, weight_decay=1e-4, lr_step=30,
                    workers=4, pretrained=False)
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


class TrainingError(Exception):
    """A failure worth one line on stderr rather than a traceback; `code` is the exit status."""

    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


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
        if value < low or (low_open and value == low) or (high is not None and value > high):
            bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"expected a value {bounds}, got {text}")
        return value
    return parse


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
    g.add_argument("--mode", default="sample", choices=MODES,
                   help="baseline; sample (Alg. 1); modality (Alg. 2); naive / reversed re-sampling (Table 4); "
                        "ogm-ge, greedy, pmr, agm, gblending: the compared methods (Table 2) (default: %(default)s)")
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
    g.add_argument("--subset-ratio", type=number(float, 0.0, 1.0, low_open=True), default=0.2,
                   help="modality mode: fraction of training samples in Z (default: %(default)s)")
    g.add_argument("--alpha", type=number(float, 0.0), default=1.0, help="modality mode: scale inside f_m (Eq. 11) (default: %(default)s)")
    g.add_argument("--f-m", default="linear", choices=shapley_mm.F_M_CHOICES, help="modality mode: f_m of Eq. 11 (default: %(default)s)")
    g.add_argument("--valuation", default="offline", choices=("offline", "online"),
                   help="offline: value the training set before each epoch in eval mode (the paper); online: take "
                        "each sample's coalition predictions from the training step that holds it (late fusion with "
                        "feature masking only) and plan the next epoch from them (default: %(default)s)")
    g.add_argument("--track-phi", action="store_true",
                   help="also value the training set in warm-up epochs and in the modes that do not re-sample, to "
                        "log contributions")
    comparators.add_arguments(p, number)
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
    g.add_argument("--out", help="run directory (default runs/<dataset>-<mode>-s<seed>-<time>)")
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
    settings["dataset"], then `settings` (flag names with underscores), checked as train.py checks its flags."""
    args = get_args_parser(settings.get("dataset", "mfeat")).parse_args([])
    unknown = set(settings) - set(vars(args))
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    vars(args).update(settings)
    return check_args(args)


def check_args(args):
    """Refuse combinations of flags no run can use, in one line; warn about ones that do nothing."""
    allowed = models.allowed_masks(args.fusion)  # the fusion's default first
    args.mask = args.mask or allowed[0]
    if args.mask not in allowed:
        raise TrainingError(f"--mask {args.mask} is not defined for --fusion {args.fusion}, which mixes the modalities "
                            f"inside the network; use --mask {' or '.join(allowed)} (zero the absent input)")
    if args.fusion == "mbt":
        try:
            models.check_mbt(**mbt_sizes(args), pretrained=args.pretrained,
                             name=lambda key: "--pretrained (off: --no-pretrained)" if key == "pretrained"
                             else "--mbt-" + key.replace("_", "-"))
        except ValueError as error:
            raise TrainingError(f"--fusion mbt: {error}")
    num_modalities = {"mfeat": len(args.views), "synthetic": args.synthetic_modalities}.get(args.dataset, 2)
    if comparators.refusal(args, num_modalities):
        raise TrainingError(comparators.refusal(args, num_modalities))
    if args.mode in comparators.METHODS and launched_by_torchrun():
        raise TrainingError(f"--mode {args.mode} is not available under torchrun: its training step calls the model "
                            f"several times and changes the gradients of its parts, which DistributedDataParallel "
                            f"does not allow; run it in one process")
    if args.mode in RESAMPLING_MODES and num_modalities < 2:
        raise TrainingError(f"--mode {args.mode} re-samples one modality against the others and needs at least two "
                            f"modalities; this run has {num_modalities} (use --mode baseline)")
    if args.valuation == "online":
        check_online(args)
    if args.dataset in AV_DATASETS and args.data_root is None:
        raise TrainingError(f"--dataset {args.dataset} needs --data-root (the folder holding its clips)")
    for flag, dataset in (("split_file", "mmdebiased"), ("list_dir", "ks")):
        if getattr(args, flag) is not None and args.dataset != dataset:
            raise TrainingError(f"--{flag.replace('_', '-')} applies to --dataset {dataset} only, not {args.dataset}")
    if args.mfeat_weak_signal > 0 and (args.dataset != "mfeat" or args.mfeat_degrade > 0 or len(args.views) < 2
                                       or args.mfeat_weak_signal >= 1):
        raise TrainingError("--mfeat-weak-signal needs --dataset mfeat, two or more --views, a value below 1 and no "
                            "--mfeat-degrade")
    if args.weights is not None and not args.pretrained:
        raise TrainingError("--weights FILE is the ImageNet file of --pretrained; add --pretrained or drop --weights")
    if args.mode != "baseline" and args.warmup >= args.epochs:
        print(f"warning: --warmup {args.warmup} is not smaller than --epochs {args.epochs}: "
              f"mode '{args.mode}' never leaves its warm-up (no re-sampling, no compared method)", file=sys.stderr)
    return args


def check_online(args):
    """--valuation online reuses the pooled features of the training step, which only late fusion with feature
    masking has: refuse it in one line elsewhere, and without a warm-up epoch to plan the first epoch from."""
    if models.classifier_kind(args.fusion) is not models.LateFusionClassifier:
        raise TrainingError(f"--valuation online reuses the features of the training step, and --fusion "
                            f"{args.fusion} mixes the modalities inside the network (no feature of its own per "
                            f"modality); use --valuation offline")
    if args.mask != "feature":
        raise TrainingError("--valuation online needs --mask feature: with --mask input a training step encodes "
                            "zeroed inputs with the batch's statistics, not the features a coalition would see; "
                            "use --valuation offline")
    if launched_by_torchrun():
        raise TrainingError("--valuation online is not available under torchrun: the training step runs through "
                            "DistributedDataParallel, which does not hand back the features it computed; use "
                            "--valuation offline")
    if args.mode != "baseline" and args.warmup < 1:
        raise TrainingError("--valuation online plans each epoch from the previous epoch's training, and --warmup 0 "
                            "leaves epoch 0 without one; use --warmup 1 or more, or --valuation offline")
    if args.mode == "baseline" and not args.track_phi:
        print("warning: --valuation online does nothing in --mode baseline without --track-phi", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# what a run is made of: device, data, model, optimiser


def select_device(gpu):
    if gpu is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if gpu < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available() or gpu >= torch.cuda.device_count():
        raise TrainingError(f"--gpu {gpu}: no such CUDA device (found {torch.cuda.device_count()}); use --gpu -1 for CPU")
    return torch.device(f"cuda:{gpu}")


def autocast(device, amp):
    """Mixed precision on CUDA when --amp is given; full precision otherwise."""
    return torch.autocast(device.type, enabled=amp and device.type == "cuda")


# ----------------------------------------------------------------------------------------------
# several processes (torchrun): one code path, a single process being a world of one


def launched_by_torchrun():
    """True in a process of a torchrun job of several processes (WORLD_SIZE > 1); a job of one is a single process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_distributed(gpu):
    """The device of this process; under torchrun (WORLD_SIZE > 1) also the default process group, from env://:
    NCCL with one GPU per process (LOCAL_RANK's), Gloo on CPUs (--gpu -1 or no GPU), as torchvision's references."""
    if not launched_by_torchrun():
        return select_device(gpu)
    use_cuda = torch.cuda.is_available() and gpu != -1
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    return device


def is_main_process():
    """True in a single process and in rank 0: the one process that prints and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def world():
    """(rank, world size) of this process; (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def broadcast(obj):
    """rank 0's `obj` on every process (as is in a single process)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def build_datasets(args):
    """train (training transforms), train_eval (the same samples, evaluation transforms), val, test."""
    options = dict(root=args.data_root, split_file=args.split_file or args.list_dir, skip_missing=args.skip_missing,
                   seed=args.seed)
    if args.dataset == "mfeat":
        options.update(views=tuple(args.views), degrade=args.mfeat_degrade, weak_signal=args.mfeat_weak_signal,
                       split_seed=args.split_seed)
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


def write_atomic(path, write_bytes):
    """Call write_bytes(file) on a temporary file beside `path`, then rename it over `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write_bytes(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_json(path, obj):
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_log(path, records):
    write_atomic(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))


def save_checkpoint(path, state):
    write_atomic(path, lambda f: torch.save(state, f))


def load_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_contributions(out, epoch, dataset, valued_index, phi, valuation="offline"):
    """contributions/epoch_NNN.npz: the contributions that planned epoch NNN, and which valuation took them."""
    ids = np.array([dataset.sample_ids[i] for i in valued_index.tolist()])

    def write(f):
        buffer = io.BytesIO()
        np.savez_compressed(buffer, ids=ids, index=valued_index.numpy(), phi=phi.numpy(),
                            modalities=np.array(dataset.modalities), valuation=np.array(valuation))
        f.write(buffer.getvalue())

    write_atomic(os.path.join(out, "contributions", f"epoch_{epoch:03d}.npz"), write)


RUN_FILES = ("args.json", "log.jsonl", "last.pt", "best.pt", "results.json")


def check_writable(out):
    """Refuse, before any work, a run directory that is a file or lies where nothing can be written."""
    existing = out
    while not os.path.exists(existing):
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing):
        raise TrainingError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainingError(f"--out {out}: {existing} is not writable")


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


def load_checkpoint(path):
    """A checkpoint written by train.py, or a TrainingError that says why not."""
    if not os.path.isfile(path):
        raise TrainingError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file
        raise TrainingError(f"checkpoint {path} could not be read ({error.__class__.__name__}: {error})")
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise TrainingError(f"checkpoint {path} was not written by train.py (no model_config)")
    return checkpoint


def check_config(checkpoint, config, path):
    """Refuse a checkpoint made for another data set, class count or model, naming what differs."""
    saved = checkpoint["model_config"]
    if saved != config:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {config[k]!r}"
                            for k in config if saved.get(k) != config[k])
        raise TrainingError(f"checkpoint {path} does not match this run ({details})")


def checkpoint_args(checkpoint, args, given, changeable):
    """The settings `checkpoint` was trained with. Flags given now that are in `changeable` replace them;
    any other flag given now must agree with them."""
    # checkpoints from before --valuation: offline; from before --split-seed and --mfeat-weak-signal: their defaults
    saved = {"valuation": "offline", "split_seed": data.MFEAT_SPLIT_SEED, "mfeat_weak_signal": 0.0,
             **checkpoint["args"]}
    for key in given:
        if key in changeable:
            saved[key] = getattr(args, key)
        elif key not in RUN_CONTROL and saved.get(key) != getattr(args, key):
            allowed = ", ".join("--" + k.replace("_", "-") for k in changeable)
            raise TrainingError(f"--{key.replace('_', '-')} {getattr(args, key)!r} differs from the checkpoint's "
                                f"{saved.get(key)!r}: a checkpoint keeps its settings (only {allowed} may change)")
    return argparse.Namespace(**saved)


# ----------------------------------------------------------------------------------------------
# one pass over a data set: evaluation and valuation (Sec. 3.2) in one read


def to_device(inputs, device):
    return [x.to(device, non_blocking=True) for x in inputs]


@torch.no_grad()
def run_pass(model, loader, device, amp=False):
    """The model over every sample the loader yields, in eval mode, once: which of the 2**n coalitions of
    modalities predict each sample correctly (shapley_mm.coalition_correctness), and the prediction from all
    modalities. Evaluation, valuation (Eq. 1-3 on `correct`) and the per-sample CSV all read this one pass.

    Returns dict(index [N] long, labels [N] long, prediction [N] long, scores [N, K] float (softmax of the
    all-modality logits), correct [N, 2**n] bool), in the loader's order. The loader should use evaluation
    transforms. For late fusion the encoders run once per batch and only the fusion head runs per coalition; for
    fusions that mix modalities inside the network the whole network runs once per coalition
    (models coalition_predictor)."""
    model.eval()
    n = model.num_modalities
    index, labels, scores, correct = [], [], [], []
    absent_cache = {}  # absent modalities' features, computed once per pass (models coalition_predictor)
    for inputs, target, sample_index in loader:
        target = target.to(device)
        with autocast(device, amp):
            predict = model.coalition_predictor(to_device(inputs, device), absent_cache)
            batch_correct, full_logits = shapley_mm.coalition_correctness(predict, target, n)
        index.append(sample_index)
        labels.append(target.cpu())
        scores.append(full_logits.float().softmax(1).cpu())
        correct.append(batch_correct.cpu())
    scores = torch.cat(scores)
    return dict(index=torch.cat(index), labels=torch.cat(labels), prediction=scores.argmax(1), scores=scores,
                correct=torch.cat(correct))


def pass_over(model, dataset, loader_kwargs, device, amp=False):
    """run_pass over the whole `dataset`, every process getting the whole result in dataset order. Under torchrun
    each process reads its shard (DistributedSampler, in order: process r takes items r, r + W, ...) and the
    shards are gathered, without the items the sampler repeats to even them out."""
    rank, world_size = world()
    # a DataLoader draws its workers' base seed from its generator when iterated, from torch's global one if it
    # has none: an evaluation pass must not move the global generator that training draws from (augmentation,
    # OGM-GE's noise), or valuing only to log (--track-phi) would change the training that follows
    own = torch.Generator()
    if world_size == 1:
        return run_pass(model, DataLoader(dataset, shuffle=False, generator=own, **loader_kwargs), device, amp)
    shard = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    part = run_pass(model, DataLoader(dataset, sampler=shard, generator=own, **loader_kwargs), device, amp)
    parts = [None] * world_size
    dist.all_gather_object(parts, part)
    return {key: torch.stack([p[key] for p in parts], 1).flatten(0, 1)[:len(dataset)] for key in part}


def contributions(result):
    """phi [N, n] of every sample of a pass (Eq. 1-3)."""
    return shapley_mm.shapley_values(shapley_mm.benefit(result["correct"]))


def metrics(result):
    """Accuracy and mAP with all modalities, and the accuracy of each modality alone, from one pass."""
    n = result["correct"].shape[1].bit_length() - 1  # correct: [N, 2**n]
    alone = result["correct"][:, [1 << i for i in range(n)]]  # [N, n], the one-modality coalitions
    return dict(acc=(result["prediction"] == result["labels"]).float().mean().item(),
                map=mean_average_precision(result["scores"], result["labels"]),
                acc_per_modality=alone.float().mean(0).tolist())


def mean_average_precision(scores, labels):
    """mAP: the mean over classes (those with at least one positive) of the average precision of
    ranking all samples by that class's score, as scikit-learn's average_precision_score (macro):
    AP = sum over score thresholds t of (R(t) - R(t_prev)) * P(t). Tied scores form one threshold,
    so the result does not depend on the order of tied rows. scores [N, K], labels [N]."""
    num_samples, num_classes = scores.shape
    positives = F.one_hot(labels, num_classes).float()  # [N, K]
    sorted_scores, order = scores.sort(dim=0, descending=True)  # [N, K]
    hits = positives.gather(0, order)  # [N, K], 1 where the r-th ranked sample is a positive
    rank = torch.arange(1, num_samples + 1, dtype=torch.float32).unsqueeze(1)  # [N, 1]
    precision = hits.cumsum(0) / rank  # [N, K], precision of the top r
    # each row takes the precision at the last row of its tie, where the threshold really lies
    last_of_tie = torch.ones_like(hits, dtype=torch.bool)
    last_of_tie[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    row = torch.arange(num_samples).unsqueeze(1).expand_as(hits)  # [N, K]
    tie_end = torch.where(last_of_tie, row, num_samples).flip(0).cummin(0).values.flip(0)  # [N, K]
    num_positives = hits.sum(0)  # [K]
    ap = (hits * precision.gather(0, tie_end)).sum(0) / num_positives.clamp(min=1)
    return ap[num_positives > 0].mean().item()


# ----------------------------------------------------------------------------------------------
# Algorithms 1 and 2: value the training set, then build the re-sampled epoch D^rs


def choose_valued(mode, num_samples, subset_ratio, generator):
    """The training samples to value: all of them (Alg. 1, line 5), or a random subset Z (Alg. 2, line 5)."""
    if mode != "modality":
        return torch.arange(num_samples)
    subset_size = max(1, int(round(subset_ratio * num_samples)))
    return torch.randperm(num_samples, generator=generator)[:subset_size].sort().values


def plan_copies(mode, phi, valued, num_samples, generator, alpha=1.0, f_m="linear"):
    """The uni-modal copies of this epoch, copies [N, n]: copies[k, i] extra copies of training sample k keep
    modality i alone. phi [V, n] are the contributions of the samples `valued` [V]."""
    n = phi.shape[1]
    if mode == "modality":  # Eq. 11: re-sample the overall low-contributing modality with probability p
        modality, probability = shapley_mm.modality_level_plan(phi, alpha=alpha, f_m=f_m)
        return shapley_mm.modality_level_copies(num_samples, n, modality, probability, generator=generator)
    copies = torch.zeros(num_samples, n, dtype=torch.long)
    copies[valued] = shapley_mm.sample_level_copies(phi)  # Eq. 10
    if mode == "naive":  # Table 4: same totals per modality, on random samples
        return shapley_mm.naive_copies(copies, generator=generator)
    if mode == "reversed":  # Table 4: the copies go to each sample's highest-contributing modality
        full_phi = torch.zeros(num_samples, n)
        full_phi[valued] = phi
        return shapley_mm.reversed_copies(full_phi, copies, generator=generator)
    return copies


def resampling_plan(phase, model, train_eval, loader_kwargs, device, generator, subset_ratio=0.2, alpha=1.0,
                    f_m="linear", amp=False, online=None):
    """One epoch's valuation and uni-modal copies (Alg. 1 lines 4-9, Alg. 2 lines 4-10): (valued [V], phi [V, n],
    copies [N, n]). Offline (online None, the paper's procedure), the samples are valued now, in eval mode with
    evaluation transforms (Eq. 1-3), all of them or the subset Z. Online, `online` is the table (online_table) the
    previous epoch's training filled, and every sample it saw is valued (Z is every sample seen). Phase "warmup"
    or "baseline" (--track-phi), and the compared methods' modes, value every sample and plan no copies."""
    resampling = phase in RESAMPLING_MODES
    if online is None:
        valued = choose_valued(phase if resampling else "sample", len(train_eval), subset_ratio, generator)
        phi = contributions(pass_over(model, Subset(train_eval, valued.tolist()), loader_kwargs, device, amp))
    else:
        valued = online["seen"].nonzero().squeeze(1)
        phi = contributions(dict(correct=online["correct"][valued]))
    if not resampling:
        return valued, phi, torch.zeros(len(train_eval), phi.shape[1], dtype=torch.long)
    return valued, phi, plan_copies(phase, phi, valued, len(train_eval), generator, alpha, f_m)


def progress(step, total, start, stream=sys.stderr):
    """A progress line for long epochs: rewritten in place on a terminal; in a log file, at most
    one line per quarter of the epoch."""
    if total < 50:
        return
    if stream.isatty():
        stream.write(f"\r  step {step}/{total}  {(time.time() - start) / step:.2f}s/step ")
        if step == total:
            stream.write("\n")
        stream.flush()
    elif step % max(1, total // 4) == 0 and step < total:
        print(f"  step {step}/{total}  {time.time() - start:.0f}s", file=stream, flush=True)


def online_table(num_samples, n):
    """What online valuation (--valuation online) records over one epoch: correct [N, 2**n] bool, which coalitions
    predicted each training sample correctly at the step that held it, and seen [N] bool."""
    return dict(correct=torch.zeros(num_samples, 2 ** n, dtype=torch.bool),
                seen=torch.zeros(num_samples, dtype=torch.bool))


@torch.no_grad()
def value_online(model, features, target, index, mask, table):
    """Online valuation of one training batch (Sec. 3.2, Eq. 1 taken during training): for the original rows (every
    modality kept; a uni-modal copy's sample is valued by its original row), the 2**n - 1 coalition predictions
    from the pooled features the step computed, outside its graph, the fusion head run per coalition with the absent
    features zeroed (feature masking), written into `table` at the rows' sample indices. features: one [B, d_i]
    per modality; target [B], mask [B, n] on the device; index [B] on the CPU."""
    original = mask.all(1)  # [B]
    if not original.any():
        return
    features = [feature[original] for feature in features]  # [B_o, d_i], no graph under no_grad
    correct, _ = shapley_mm.coalition_correctness(lambda keep: model.fuse(features, keep), target[original],
                                                  model.num_modalities)
    rows = index[original.cpu()]
    table["correct"][rows] = correct.cpu()
    table["seen"][rows] = True


def train_one_epoch(model, loader, optimizer, scaler, device, epoch, amp=False, online=None, method=None):
    """One pass over D^rs (Alg. 1 line 11). Each batch mixes full samples and uni-modal copies in shuffled
    order, as the paper trains; `mask` [B, n] says which modalities each row keeps. With `online` (a table from
    online_table; late fusion with feature masking), each step's features are also valued (value_online). A
    compared `method` (comparators.py; D^rs = D) replaces the forward and loss, and changes the gradients before
    the step."""
    model.train()
    total_loss, total_samples, start = 0.0, 0, time.time()
    for step, (inputs, target, index, mask) in enumerate(loader, start=1):
        target, mask = target.to(device), mask.to(device)
        with autocast(device, amp):
            inputs = to_device(inputs, device)
            if method is not None:  # a compared method's own forward and loss (D^rs = D)
                loss = method.loss(model, inputs, target)
            elif online is not None:  # forward as encode then fuse, so that valuation reuses the step's features
                features = model.encode(inputs, mask)
                loss = F.cross_entropy(model.fuse(features).float(), target)
                value_online(model, features, target, index, mask, online)
            else:
                loss = F.cross_entropy(model(inputs, mask).float(), target)
        if not torch.isfinite(loss):  # under torchrun, the process that sees it stops, and torchrun ends the others
            kept = (f"last.pt holds epoch {epoch - 1}, the last good one" if epoch > 0
                    else "no checkpoint was written")
            raise TrainingError(f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step}: stopped; {kept}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if method is not None:
            scaler.unscale_(optimizer)
            method.modulate(model)
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss.item() * len(target)
        total_samples += len(target)
        progress(step, len(loader), start)
    if dist.is_initialized():  # the mean over every process's rows
        totals = torch.tensor([total_loss, total_samples], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        total_loss, total_samples = totals[0].item(), int(totals[1].item())
    return total_loss / max(total_samples, 1), total_samples


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


def train(args, given=()):
    """Train as `args` say (Algorithms 1 and 2), then test the checkpoint chosen on validation."""
    resume = load_checkpoint(args.resume) if args.resume else None
    if resume is not None:  # the run goes on with its own settings, in its own directory
        resume_path = args.resume
        args = checkpoint_args(resume, args, given, RESUME_OVERRIDES)
        args.resume, args.out = resume_path, os.path.dirname(os.path.abspath(resume_path))
        if resume["epoch"] + 1 >= args.epochs:
            print(f"nothing left to train: {resume_path} holds epoch {resume['epoch']} of a run of {args.epochs} "
                  f"epochs; pass --epochs N to extend it (files left as they are)")
            return None
    elif is_main_process():
        check_writable(args.out)
    device = setup_distributed(args.gpu)
    if args.sync_bn and (device.type != "cuda" or not dist.is_initialized() or args.mask == "feature"):
        raise TrainingError("--sync-bn needs torchrun with GPUs and --mask input (with feature masking an encoder "
                            "skips the batches that hold none of its modality, and the processes would wait)")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)  # shuffling, Z, and the random re-sampling draws

    splits = build_datasets(args)
    train_set, train_eval = splits["train"], splits["train_eval"]
    config = model_config(args, train_set)
    model = build_model(args, train_set).to(device)
    optimizer, scheduler = build_optimizer(args, model)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    loader_kwargs = loader_settings(args, device)
    trained = model  # what the training step calls; evaluation and valuation call `model` itself
    if dist.is_initialized():
        if args.sync_bn:
            trained = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # with feature masking an encoder skips a batch that holds none of its modality: its weights get no grad
        trained = DistributedDataParallel(trained, device_ids=[device] if device.type == "cuda" else None,
                                          find_unused_parameters=args.mask == "feature")
    method = None
    if args.mode in comparators.METHODS:
        method = comparators.build(args, model, splits, loader_kwargs, device, generator)

    out = args.out
    if resume is not None:
        check_config(resume, config, args.resume)
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        set_rng_state(resume["rng"], generator)
        if method is not None:
            method.load_state_dict(resume["method"])
        start_epoch, best, log = resume["epoch"] + 1, resume["best"], resume["log"]  # the history travels with it
        online_values = resume.get("online")  # --valuation online: the table the saved epoch filled
        print(f"resuming {out} after epoch {resume['epoch']}")
    else:
        if is_main_process():
            prepare_run_dir(out, args.overwrite)
        start_epoch, best, log = 0, dict(val_acc=-1.0, epoch=-1), []
        online_values = None
    if is_main_process():
        save_json(os.path.join(out, "args.json"), vars(args))
        save_log(os.path.join(out, "log.jsonl"), log)
    n = len(train_set.modalities)
    classes = f"{train_set.num_classes} classes"
    if train_set.classes_inferred_from:
        classes += f" (inferred from {train_set.classes_inferred_from})"
    online = ", online valuation" if args.valuation == "online" else ""
    print(f"{args.dataset}: {len(train_set)} train / {len(splits['val'])} val / {len(splits['test'])} test, "
          f"modalities {', '.join(train_set.modalities)}, {classes}; mode {args.mode}, "
          f"fusion {args.fusion}, {args.mask} masking{online}, device {device}; writing {out}")

    epoch, saved_epoch = start_epoch, start_epoch - 1
    try:
        for epoch in range(start_epoch, args.epochs):
            start = time.time()
            if args.mode == "baseline":
                phase = "baseline"
            else:  # Alg. 1 / 2, line 2: plain joint training for the first F epochs
                phase = "warmup" if epoch < args.warmup else args.mode
            if method is not None and args.modulation_ends is not None and epoch > args.modulation_ends:
                phase = "joint"  # a comparator's last epoch is past: plain joint training
            copies = torch.zeros(len(train_set), n, dtype=torch.long)
            valued = phi = None
            valuation_seconds = 0.0
            # offline: value the training set now; online: plan from what the previous epoch's training valued
            if (phase in RESAMPLING_MODES or args.track_phi) and (
                    args.valuation == "offline" or online_values is not None):
                valued, phi, copies = resampling_plan(phase, model, train_eval, loader_kwargs, device, generator,
                                                      args.subset_ratio, args.alpha, args.f_m, args.amp,
                                                      online=online_values)
                if is_main_process():
                    save_contributions(out, epoch, train_eval, valued, phi, args.valuation)
                valuation_seconds = time.time() - start
            # online: value this epoch's samples in its training steps when the next epoch will need them
            online_values = (online_table(len(train_set), n) if args.valuation == "online" and (
                args.track_phi or (args.mode != "baseline" and epoch + 1 >= args.warmup)) else None)

            copy_index, copy_modality = shapley_mm.expand_copies(copies)
            epoch_set = data.ResampledDataset(train_set, copy_index, copy_modality)  # D^rs = D + copies
            # no encoder sees a lone sample; under torchrun each process trains on its share of the batches
            batches = data.TrainingBatches(epoch_set, args.batch_size, generator, *world())
            loader = DataLoader(epoch_set, batch_sampler=batches, generator=generator, num_workers=args.workers,
                                pin_memory=device.type == "cuda")
            lr = optimizer.param_groups[0]["lr"]
            if method is not None:
                method.start_epoch(epoch, active=phase == args.mode)
            train_loss, train_samples = train_one_epoch(trained, loader, optimizer, scaler, device, epoch, args.amp,
                                                        online=online_values, method=method)
            if method is not None:
                method.end_epoch(epoch)
            scheduler.step()
            val = metrics(pass_over(model, splits["val"], loader_kwargs, device, args.amp))

            record = dict(epoch=epoch, phase=phase, train_loss=train_loss, train_samples=train_samples,
                          copies=copies.sum(0).tolist(), mean_phi=phi.mean(0).tolist() if phi is not None else None,
                          valued_samples=len(valued) if valued is not None else 0,
                          val_acc=val["acc"], val_map=val["map"], val_acc_per_modality=val["acc_per_modality"],
                          lr=lr, valuation_seconds=valuation_seconds, seconds=time.time() - start)
            if args.valuation == "online":  # offline records, the paper's procedure, keep their earlier form
                record["valuation"] = "online"
            if method is not None:
                record["method"] = method.summary()
            log.append(record)
            print(format_epoch(record, train_set.modalities), flush=True)

            is_best = val["acc"] > best["val_acc"]  # chosen on validation, never on test
            if is_best:
                best = dict(val_acc=val["acc"], epoch=epoch)
            state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         scaler=scaler.state_dict(), epoch=epoch, best=best, rng=rng_state(generator), log=log,
                         plan=dict(valued_index=valued, phi=phi, copies=copies), online=online_values, args=vars(args),
                         model_config=config, method=method.state_dict() if method is not None else None)
            if is_main_process():
                save_log(os.path.join(out, "log.jsonl"), log)
                if is_best:
                    save_checkpoint(os.path.join(out, "best.pt"), state)
                save_checkpoint(os.path.join(out, "last.pt"), state)
            saved_epoch = epoch
    except KeyboardInterrupt:
        last = os.path.join(out, "last.pt")
        kept = (f"{last} holds epoch {saved_epoch}; continue with: python train.py --resume {last}"
                if saved_epoch >= 0 else "no checkpoint was written")
        raise TrainingError(f"interrupted in epoch {epoch}: {kept}", code=130)

    # the test split is read once, for the checkpoint chosen on validation (rank 0's file, sent to every process)
    best_state = broadcast(load_checkpoint(os.path.join(out, "best.pt")) if is_main_process() else None)
    model.load_state_dict(best_state["model"])
    test_pass = pass_over(model, splits["test"], loader_kwargs, device, args.amp)
    test = metrics(test_pass)
    results = dict(best_epoch=best_state["epoch"], val_acc=best_state["best"]["val_acc"],
                   test_acc=test["acc"], test_map=test["map"], test_acc_per_modality=test["acc_per_modality"],
                   test_mean_phi=contributions(test_pass).mean(0).tolist(), modalities=list(train_set.modalities),
                   train_seconds=sum(r["seconds"] for r in log))
    if is_main_process():
        save_json(os.path.join(out, "results.json"), results)
    names = train_set.modalities
    print(f"best epoch {results['best_epoch']} (val acc {100 * results['val_acc']:.2f})")
    print(f"test acc {100 * test['acc']:.2f}  mAP {100 * test['map']:.2f}")
    print("test acc per modality: " + ", ".join(f"{m} {100 * a:.2f}" for m, a in zip(names, test["acc_per_modality"])))
    print("mean contribution on test: " + ", ".join(f"{m} {p:.3f}" for m, p in zip(names, results["test_mean_phi"])))
    return results


def evaluate_checkpoint(path, split="test", args=None, given=()):
    """One pass of a saved model over `split`: (the pass, as run_pass returns it, with phi [N, n] and the
    checkpoint's epoch added; the data set). Flags `given` in `args` may replace EVAL_OVERRIDES settings (another
    --data-root, say); any other given flag must agree with the checkpoint."""
    checkpoint = load_checkpoint(path)
    saved = checkpoint_args(checkpoint, args, given, EVAL_OVERRIDES)
    device = setup_distributed(saved.gpu)
    splits = build_datasets(saved)
    dataset = splits["train_eval" if split == "train" else split]
    check_config(checkpoint, model_config(saved, dataset), path)
    model = build_model(saved, dataset).to(device)
    model.load_state_dict(checkpoint["model"])
    loader_kwargs = loader_settings(saved, device)
    result = pass_over(model, dataset, loader_kwargs, device, saved.amp)
    result["phi"] = contributions(result)
    # [N, n], Figure 4: OGM-GE's confidence of each modality (a second read of the split, for --eval-only only)
    result["ogm_score"] = comparators.confidence_pass(model, DataLoader(dataset, shuffle=False, **loader_kwargs), device)
    result["epoch"] = checkpoint["epoch"]
    return result, dataset


def eval_only(args, given=()):
    """Evaluate --resume CHECKPOINT on --eval-split and write a CSV of per-sample valuation beside it."""
    if args.resume is None:
        raise TrainingError("--eval-only needs --resume CHECKPOINT (RUN_DIR/best.pt or last.pt)")
    result, dataset = evaluate_checkpoint(args.resume, args.eval_split, args, given)
    scores = metrics(result)
    out = os.path.dirname(os.path.abspath(args.resume))
    csv_path = os.path.join(out, f"valuation_{args.eval_split}.csv")

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

    if is_main_process():
        write_atomic(csv_path, write)
    results = dict(split=args.eval_split, checkpoint=os.path.abspath(args.resume), epoch=result["epoch"],
                   acc=scores["acc"], map=scores["map"], acc_per_modality=scores["acc_per_modality"],
                   mean_phi=result["phi"].mean(0).tolist(), modalities=list(dataset.modalities))
    if is_main_process():
        save_json(os.path.join(out, f"eval_{args.eval_split}.json"), results)
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
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:  # under torchrun, rank 0 alone reports progress; errors still name the process they come from
        sys.stdout = open(os.devnull, "w")
    where = f"rank {rank}: " if launched_by_torchrun() else ""
    try:
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

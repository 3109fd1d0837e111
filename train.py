"""Train a multimodal classifier with sample-level modality valuation (Wei et al., CVPR 2024).

One script for every mode of the paper:
    baseline   joint training of all modalities (the "Concatenation" rows of Tables 1-4)
    sample     Algorithm 1: value every training sample each epoch (Eq. 1-3), re-sample its
               low-contributing modalities (Eq. 10)
    modality   Algorithm 2: value a random subset Z, re-sample the overall low-contributing
               modality with probability p (Eq. 11)
    naive      Table 4: as many uni-modal copies per modality as `sample`, on random samples
    reversed   Table 4: the copies go to each sample's highest-contributing modality

    python train.py                                   # bundled UCI digits, CPU, about two minutes
    python train.py --dataset ks --data-root /data/ks --mode sample --gpu 0

Each run writes into its directory (--out): args.json, log.jsonl (one JSON object per epoch),
contributions/epoch_NNN.npz (phi of every valued sample), best.pt, last.pt and results.json.
"""
import argparse
import csv
import io
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import data
import models
import shapley_mm

MODES = ("baseline", "sample", "modality", "naive", "reversed")
AV_DATASETS = ("ks", "mmdebiased", "ucf101")

# Defaults per data set for every flag left unset. The audio-visual ones follow the paper (Sec. 4.1:
# SGD, momentum 0.9, lr 1e-3, batch 64, warm-up 5); the authors' code instead defaults to Adam,
# lr 5e-5, weight decay 1e-4, StepLR(30, 0.1), 60 epochs. mfeat and synthetic are sized for a CPU.
DEFAULTS = {
    "ks": dict(epochs=60, warmup=5, batch_size=64, optimizer="sgd", lr=1e-3, weight_decay=1e-4,
               lr_step=30, workers=4),
    "mmdebiased": dict(epochs=60, warmup=5, batch_size=64, optimizer="sgd", lr=1e-3, weight_decay=1e-4,
                       lr_step=30, workers=4),
    "ucf101": dict(epochs=60, warmup=5, batch_size=64, optimizer="sgd", lr=1e-3, weight_decay=1e-4,
                   lr_step=30, workers=4, pretrained=True),
    "mfeat": dict(epochs=40, warmup=5, batch_size=64, optimizer="sgd", lr=1e-2, weight_decay=1e-4,
                  lr_step=30, workers=0),
    "synthetic": dict(epochs=6, warmup=2, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=0.0,
                      lr_step=0, workers=0),
}
# Flags a resumed run (--resume) or an evaluation (--eval-only) may change; every other setting comes from the
# checkpoint, and a flag given that disagrees with it is an error.
RESUME_OVERRIDES = ("epochs", "gpu", "workers", "data_root", "split_file")
EVAL_OVERRIDES = ("gpu", "workers", "data_root", "split_file")
RUN_CONTROL = ("resume", "eval_only", "checkpoint", "eval_split", "overwrite", "out")


class TrainingError(Exception):
    """A failure worth one line on stderr rather than a traceback."""


def get_args_parser():
    p = argparse.ArgumentParser(
        description="Multimodal training with sample-level modality valuation (Wei et al., CVPR 2024).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="mfeat", choices=data.DATASETS,
                   help="mfeat: bundled UCI Multiple Features digits (no download); ks: Kinetics-Sounds; "
                        "mmdebiased: MM-Debiased; ucf101: UCF-101 RGB + optical flow; synthetic: generated in memory")
    g.add_argument("--data-root", default=None, help="root folder of ks / mmdebiased / ucf101 (see README for layouts)")
    g.add_argument("--split-file", default=None,
                   help="mmdebiased: the JSON split file; ks: a folder of OGM-GE style 'id,10,label' lists")
    g.add_argument("--views", default="pix,mor",
                   help=f"mfeat views to use, comma-separated, in order (from {','.join(data.MFEAT_VIEWS)}); "
                        "the default pairs a strong view with a weak one")
    g.add_argument("--mfeat-degrade", type=float, default=0.0,
                   help="mfeat: blend one random view of every sample with noise of strength U(0, this), giving "
                        "sample-level imbalance at dataset-level balance (like MM-Debiased)")
    g.add_argument("--image-size", type=int, default=224, help="frame / image side for ks, mmdebiased, ucf101")
    g.add_argument("--synthetic-modalities", type=int, default=2, help="synthetic: number of modalities")
    g.add_argument("--synthetic-samples", type=int, default=600, help="synthetic: training samples (val, test: a third)")
    g.add_argument("--synthetic-size", type=int, default=32, help="synthetic: image side in pixels")
    g.add_argument("--synthetic-discrepancy", type=float, default=0.5,
                   help="synthetic: fraction of samples whose class only one modality carries")
    g.add_argument("--skip-missing", action="store_true",
                   help="skip listed clips whose files are missing (counted and listed at start-up) instead of failing")
    g = p.add_argument_group("method")
    g.add_argument("--mode", default="sample", choices=MODES,
                   help="baseline; sample (Alg. 1); modality (Alg. 2); naive / reversed re-sampling (Table 4)")
    g.add_argument("--fusion", default="concat", choices=models.FUSIONS, help="fusion design (concat is the paper's)")
    g.add_argument("--mask", default=None, choices=("feature", "input"),
                   help="how a modality is removed: zero its encoder feature (the authors' code) or its input "
                        "(the paper's text); default feature, input for fusions that mix modalities inside the network")
    g.add_argument("--warmup", type=int, default=None, help="epochs of plain joint training before the first valuation")
    g.add_argument("--subset-ratio", type=float, default=0.2, help="modality mode: fraction of training samples in Z")
    g.add_argument("--alpha", type=float, default=1.0, help="modality mode: scale inside f_m (Eq. 11)")
    g.add_argument("--f-m", default="linear", choices=("linear", "tanh", "square"), help="modality mode: f_m of Eq. 11")
    g.add_argument("--track-phi", action="store_true",
                   help="also value the training set in warm-up epochs and in baseline mode, to log contributions")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="total epochs, warm-up included")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--optimizer", default=None, choices=("sgd", "adam"))
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--lr-step", type=int, default=None, help="StepLR period in epochs; 0 keeps the lr constant")
    g.add_argument("--lr-gamma", type=float, default=0.1, help="StepLR factor")
    g.add_argument("--pretrained", action="store_true", default=None,
                   help="start ResNet-18 encoders from ImageNet weights (default for ucf101, as in the paper)")
    g.add_argument("--amp", action="store_true", help="mixed precision on GPU (no-op on CPU)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--gpu", type=int, default=None, help="GPU index; -1 for the CPU; default: the first GPU if any")
    g.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    g.add_argument("--out", default=None, help="run directory (default runs/<dataset>-<mode>-s<seed>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="write into an existing run directory, replacing it")
    g.add_argument("--resume", default=None, metavar="RUN_DIR/last.pt",
                   help="continue that run in its own directory (--epochs may extend it)")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate --checkpoint on --eval-split and write a CSV of per-sample valuation")
    g.add_argument("--checkpoint", default=None, help="checkpoint for --eval-only")
    g.add_argument("--eval-split", default="test", choices=("train", "val", "test"), help="split for --eval-only")
    return p


def resolve_args(args):
    """Fill the flags left unset with the data set's defaults and check the combination."""
    for key, value in DEFAULTS[args.dataset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.pretrained is None:
        args.pretrained = False
    allowed = models.allowed_masks(args.fusion)  # the default first
    if args.mask is None:
        args.mask = allowed[0]
    if args.mask not in allowed:
        raise TrainingError(f"--mask {args.mask} is not defined for --fusion {args.fusion}; use --mask "
                            f"{' or '.join(allowed)}")
    if args.epochs < 1:
        raise TrainingError(f"--epochs must be at least 1, got {args.epochs}")
    if args.warmup < 0:
        raise TrainingError(f"--warmup must be >= 0, got {args.warmup}")
    if not 0.0 < args.subset_ratio <= 1.0:
        raise TrainingError(f"--subset-ratio must be in (0, 1], got {args.subset_ratio}")
    if args.dataset == "mfeat":
        unknown = [v for v in args.views.split(",") if v not in data.MFEAT_VIEWS]
        if unknown or not args.views:
            raise TrainingError(f"--views {args.views!r}: unknown view {', '.join(unknown)}; "
                                f"choose from {','.join(data.MFEAT_VIEWS)}")
    if args.dataset in AV_DATASETS and args.data_root is None:
        raise TrainingError(f"--dataset {args.dataset} needs --data-root (the folder holding its clips)")
    if args.mode != "baseline" and args.warmup >= args.epochs:
        print(f"warning: --warmup {args.warmup} is not smaller than --epochs {args.epochs}: "
              f"no re-sampling will ever happen in mode '{args.mode}'", file=sys.stderr)
    return args


def select_device(gpu):
    if gpu is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if gpu < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available() or gpu >= torch.cuda.device_count():
        raise TrainingError(f"--gpu {gpu}: no such CUDA device (found {torch.cuda.device_count()}); use --gpu -1 for CPU")
    return torch.device(f"cuda:{gpu}")


def build_datasets(args):
    """train (training transforms), train_eval (the same samples, evaluation transforms), val, test."""
    options = dict(root=args.data_root, split_file=args.split_file, skip_missing=args.skip_missing, seed=args.seed)
    if args.dataset == "mfeat":
        options.update(views=tuple(v for v in args.views.split(",") if v), degrade=args.mfeat_degrade)
    elif args.dataset == "synthetic":
        options.update(num_modalities=args.synthetic_modalities, size=args.synthetic_size,
                       sample_discrepancy=args.synthetic_discrepancy, train_size=args.synthetic_samples,
                       val_size=max(1, args.synthetic_samples // 3), test_size=max(1, args.synthetic_samples // 3))
    else:
        options["image_size"] = args.image_size
    splits = {
        "train": data.build_dataset(args.dataset, "train", augment=True, **options),
        "train_eval": data.build_dataset(args.dataset, "train", augment=False, **options),
        "val": data.build_dataset(args.dataset, "val", **options),
        "test": data.build_dataset(args.dataset, "test", **options),
    }
    for split, dataset in splits.items():
        if split != "train_eval" and dataset.skipped:
            shown = ", ".join(f"{sample_id} ({reason})" for sample_id, reason in dataset.skipped[:5])
            more = f" and {len(dataset.skipped) - 5} more" if len(dataset.skipped) > 5 else ""
            print(f"skipped {len(dataset.skipped)} {split} clips with missing files: {shown}{more}")
    return splits


def model_config(args, dataset):
    """What a checkpoint must agree with to be loaded into this run."""
    return dict(dataset=args.dataset, views=args.views if args.dataset == "mfeat" else None,
                modalities=list(dataset.modalities), input_specs=[list(s) for s in dataset.input_specs],
                num_classes=dataset.num_classes, fusion=args.fusion, mask=args.mask)


def build_model(args, dataset):
    return models.build_model(dataset.input_specs, dataset.num_classes, fusion=args.fusion, mask_mode=args.mask,
                              pretrained=args.pretrained)


def build_optimizer(args, model):
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step = args.lr_step if args.lr_step > 0 else 2 ** 62  # 0: never decays (whatever --epochs a resume sets)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=args.lr_gamma)
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------
# atomic file writes: a run killed at any moment leaves the previous files intact


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
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# metrics


def mean_average_precision(scores, labels):
    """mAP: mean over classes (with at least one positive) of the average precision of ranking
    all samples by that class's score. scores [N, K] float, labels [N] long."""
    num_classes = scores.shape[1]
    positives = F.one_hot(labels, num_classes).bool()  # [N, K]
    order = scores.argsort(dim=0, descending=True)  # [N, K]
    hits = positives.gather(0, order).float()  # [N, K], 1 where the r-th ranked sample is a positive
    precision_at_rank = hits.cumsum(0) / torch.arange(1, len(labels) + 1, dtype=torch.float32).unsqueeze(1)
    num_positives = hits.sum(0)
    ap = (precision_at_rank * hits).sum(0) / num_positives.clamp(min=1)
    return ap[num_positives > 0].mean().item()


def to_device(inputs, device):
    return [x.to(device, non_blocking=True) for x in inputs]


@torch.no_grad()
def evaluate(model, loader, device, amp=False):
    """Accuracy and mAP with all modalities, and the accuracy of each modality alone.

    The full and the uni-modal predictions are coalitions of the same batch
    (models.MultimodalClassifier.coalition_predictor): for late fusion the encoders run once per
    batch; for centralnet and mmtm the whole network runs once per coalition."""
    model.eval()
    n = model.num_modalities
    unimodal = torch.eye(n, dtype=torch.bool, device=device)
    scores, labels, correct_alone = [], [], []
    absent_cache = {}  # absent modalities' features, computed once per pass (models.coalition_predictor)
    for inputs, target, _ in loader:
        target = target.to(device)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            predict = model.coalition_predictor(to_device(inputs, device), absent_cache)
            full = predict(torch.ones(len(target), n, dtype=torch.bool, device=device))
            alone = [predict(unimodal[i].expand(len(target), n)).argmax(1) == target for i in range(n)]
        scores.append(full.float().softmax(1).cpu())
        labels.append(target.cpu())
        correct_alone.append(torch.stack(alone, 1).cpu())  # [B, n]
    scores, labels, correct_alone = torch.cat(scores), torch.cat(labels), torch.cat(correct_alone)
    return dict(acc=(scores.argmax(1) == labels).float().mean().item(),
                map=mean_average_precision(scores, labels),
                acc_per_modality=correct_alone.float().mean(0).tolist())


@torch.no_grad()
def valuate(model, loader, device, amp=False, with_predictions=False):
    """Sample-level modality valuation (Eq. 1-3) of every sample the loader yields.

    Returns (index [N] long, phi [N, n] float), in the loader's order, and with with_predictions also the
    prediction [N] long from all modalities (one more coalition call per batch). Runs in
    eval mode; the loader should use evaluation transforms. For late fusion the encoders run once per
    batch and only the fusion head runs per coalition; for centralnet and mmtm the whole network runs
    once per coalition (models.MultimodalClassifier.coalition_predictor)."""
    model.eval()
    n = model.num_modalities
    indices, phis, predictions = [], [], []
    absent_cache = {}  # absent modalities' features, computed once per pass (models.coalition_predictor)
    for inputs, target, index in loader:
        target = target.to(device)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            predict = model.coalition_predictor(to_device(inputs, device), absent_cache)
            phi = shapley_mm.valuate(predict, target, n)
            if with_predictions:
                predictions.append(predict(torch.ones(len(target), n, dtype=torch.bool, device=device)).argmax(1).cpu())
        indices.append(index)
        phis.append(phi.float().cpu())
    if with_predictions:
        return torch.cat(indices), torch.cat(phis), torch.cat(predictions)
    return torch.cat(indices), torch.cat(phis)


# ----------------------------------------------------------------------------------------------
# Algorithms 1 and 2: build the re-sampled epoch D^rs


def resampling_plan(args, model, train_eval, loader_kwargs, generator, device):
    """Value the training set (or the subset Z) and decide the uni-modal copies of this epoch.

    Returns (valued_index [V], phi [V, n], copies [N, n]): copies[k, i] is how many extra copies of
    training sample k keep modality i alone."""
    num_samples, n = len(train_eval), len(train_eval.modalities)
    if args.mode == "modality":  # Alg. 2: value only a random subset Z of the training set
        subset_size = max(1, int(round(args.subset_ratio * num_samples)))
        valued = torch.randperm(num_samples, generator=generator)[:subset_size].sort().values
    else:  # Alg. 1: value every training sample
        valued = torch.arange(num_samples)
    loader = DataLoader(Subset(train_eval, valued.tolist()), shuffle=False, **loader_kwargs)
    valued_index, phi = valuate(model, loader, device, args.amp)

    if args.mode == "modality":  # Eq. 11: re-sample the overall low-contributing modality with probability p
        modality, probability = shapley_mm.modality_level_plan(phi, alpha=args.alpha, f_m=args.f_m)
        copies = shapley_mm.modality_level_copies(num_samples, n, modality, probability, generator=generator)
        return valued_index, phi, copies
    copies = torch.zeros(num_samples, n, dtype=torch.long)
    copies[valued_index] = shapley_mm.sample_level_copies(phi)  # Eq. 10
    if args.mode == "naive":  # Table 4: same totals per modality, on random samples
        copies = shapley_mm.naive_copies(copies, generator=generator)
    elif args.mode == "reversed":  # Table 4: the copies go to each sample's highest-contributing modality
        full_phi = torch.zeros(num_samples, n)
        full_phi[valued_index] = phi
        copies = shapley_mm.reversed_copies(full_phi, copies)
    return valued_index, phi, copies


def progress(step, total, start, stream=sys.stderr):
    """A progress line for long epochs: rewritten in place on a terminal; in a log file, at most
    one line per quarter of the epoch."""
    if total < 50:
        return
    if stream.isatty():
        elapsed = time.time() - start
        stream.write(f"\r  step {step}/{total}  {elapsed / step:.2f}s/step ")
        if step == total:
            stream.write("\n")
        stream.flush()
    elif step % max(1, total // 4) == 0 and step < total:
        print(f"  step {step}/{total}  {time.time() - start:.0f}s", file=stream, flush=True)


def train_one_epoch(model, loader, optimizer, scaler, device, epoch, amp=False):
    """One pass over D^rs. Each batch mixes full samples and uni-modal copies in shuffled order, as
    the paper trains; `mask` [B, n] says which modalities each row keeps."""
    model.train()
    total_loss, total_samples, start = 0.0, 0, time.time()
    for step, (inputs, target, _, mask) in enumerate(loader, start=1):
        target, mask = target.to(device), mask.to(device)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            logits = model(to_device(inputs, device), mask)
            loss = F.cross_entropy(logits.float(), target)
        if not torch.isfinite(loss):
            kept = (f"last.pt holds epoch {epoch - 1}, the last good one" if epoch > 0
                    else "no checkpoint was written")
            raise TrainingError(f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step}: stopped; {kept}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss.item() * len(target)
        total_samples += len(target)
        progress(step, len(loader), start)
    return total_loss / max(total_samples, 1), total_samples


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


def load_checkpoint(path, config=None):
    """Load a checkpoint; when `config` is given, refuse one made for another data set or model."""
    if not os.path.isfile(path):
        raise TrainingError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file
        raise TrainingError(f"checkpoint {path} could not be read ({error.__class__.__name__}: {error})")
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise TrainingError(f"checkpoint {path} was not written by train.py (no model_config)")
    if config is not None:
        check_config(checkpoint, config, path)
    return checkpoint


def check_config(checkpoint, config, path):
    """Refuse a checkpoint made for another data set, class count or model, naming what differs."""
    saved = checkpoint["model_config"]
    if saved != config:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {config[k]!r}"
                            for k in config if saved.get(k) != config[k])
        raise TrainingError(f"checkpoint {path} does not match this run ({details})")


RUN_FILES = ("args.json", "log.jsonl", "last.pt", "best.pt", "results.json")


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


def save_contributions(out, epoch, dataset, valued_index, phi):
    ids = np.array([dataset.sample_ids[i] for i in valued_index.tolist()])

    def write(f):
        buffer = io.BytesIO()
        np.savez_compressed(buffer, ids=ids, index=valued_index.numpy(), phi=phi.numpy(),
                            modalities=np.array(dataset.modalities))
        f.write(buffer.getvalue())

    write_atomic(os.path.join(out, "contributions", f"epoch_{epoch:03d}.npz"), write)


def format_epoch(record, modalities):
    def per_modality(values, scale=1, fmt="{:.1f}"):
        return " ".join(f"{m} {fmt.format(v * scale)}" for m, v in zip(modalities, values))

    line = (f"epoch {record['epoch']:3d} {record['phase']:>8} | loss {record['train_loss']:.3f} "
            f"| samples {record['train_samples']}")
    if any(record["copies"]):
        line += f" (copies: {per_modality(record['copies'], fmt='{:d}')})"
    if record["mean_phi"] is not None:
        line += f" | phi {per_modality(record['mean_phi'], fmt='{:.2f}')}"
    line += (f" | val acc {100 * record['val_acc']:.1f} map {100 * record['val_map']:.1f} "
             f"| alone {per_modality(record['val_acc_per_modality'], 100)} | {record['seconds']:.1f}s")
    return line


# ----------------------------------------------------------------------------------------------


def loader_settings(args, device):
    return dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda",
                persistent_workers=False)


def checkpoint_args(checkpoint, args, given, changeable):
    """The settings `checkpoint` was trained with. Flags given now that are in `changeable` replace them;
    any other flag given now must agree with them."""
    saved = dict(checkpoint["args"])
    for key in given:
        if key in changeable:
            saved[key] = getattr(args, key)
        elif key not in RUN_CONTROL and saved.get(key) != getattr(args, key):
            allowed = ", ".join("--" + k.replace("_", "-") for k in changeable)
            raise TrainingError(f"--{key.replace('_', '-')} {getattr(args, key)!r} differs from the checkpoint's "
                                f"{saved.get(key)!r}: a checkpoint keeps its settings (only {allowed} may change)")
    return argparse.Namespace(**saved)


def train(args, given=()):
    device = select_device(args.gpu)
    resume = load_checkpoint(args.resume) if args.resume else None
    if resume is not None:  # the run goes on with its own settings, in its own directory
        resume_path = args.resume
        args = checkpoint_args(resume, args, given, RESUME_OVERRIDES)
        args.resume, args.out = resume_path, os.path.dirname(os.path.abspath(resume_path))
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
    val_loader = DataLoader(splits["val"], shuffle=False, **loader_kwargs)

    out = args.out
    if resume is not None:
        check_config(resume, config, args.resume)
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        set_rng_state(resume["rng"], generator)
        start_epoch, best = resume["epoch"] + 1, resume["best"]
        log = [r for r in load_log(os.path.join(out, "log.jsonl")) if r["epoch"] < start_epoch]
        print(f"resuming {out} after epoch {resume['epoch']}")
    else:
        prepare_run_dir(out, args.overwrite)
        start_epoch, best, log = 0, dict(val_acc=-1.0, epoch=-1), []
    save_json(os.path.join(out, "args.json"), vars(args))
    n = len(train_set.modalities)
    print(f"{args.dataset}: {len(train_set)} train / {len(splits['val'])} val / {len(splits['test'])} test, "
          f"modalities {', '.join(train_set.modalities)}, {train_set.num_classes} classes; mode {args.mode}, "
          f"fusion {args.fusion}, {args.mask} masking, device {device}; writing {out}")

    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        if args.mode == "baseline":
            phase = "baseline"
        else:  # Alg. 1 / 2, line 2: plain joint training for the first F epochs
            phase = "warmup" if epoch < args.warmup else args.mode
        copies = torch.zeros(len(train_set), n, dtype=torch.long)
        valued_index = phi = None
        valuation_seconds = 0.0
        if phase not in ("warmup", "baseline"):
            valued_index, phi, copies = resampling_plan(args, model, train_eval, loader_kwargs, generator, device)
            valuation_seconds = time.time() - start
        elif args.track_phi:
            tracked = time.time()
            loader = DataLoader(train_eval, shuffle=False, **loader_kwargs)
            valued_index, phi = valuate(model, loader, device, args.amp)
            valuation_seconds = time.time() - tracked
        if phi is not None:
            save_contributions(out, epoch, train_eval, valued_index, phi)

        copy_index, copy_modality = shapley_mm.expand_copies(copies)
        epoch_set = data.ResampledDataset(train_set, copy_index, copy_modality)  # D^rs = D + copies
        loader = DataLoader(epoch_set, shuffle=True, generator=generator, **loader_kwargs)
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_samples = train_one_epoch(model, loader, optimizer, scaler, device, epoch, args.amp)
        scheduler.step()
        metrics = evaluate(model, val_loader, device, args.amp)

        record = dict(epoch=epoch, phase=phase, train_loss=train_loss, train_samples=train_samples,
                      copies=copies.sum(0).tolist(),
                      mean_phi=phi.mean(0).tolist() if phi is not None else None,
                      valued_samples=len(valued_index) if valued_index is not None else 0,
                      val_acc=metrics["acc"], val_map=metrics["map"],
                      val_acc_per_modality=metrics["acc_per_modality"], lr=lr,
                      valuation_seconds=valuation_seconds, seconds=time.time() - start)
        log.append(record)
        print(format_epoch(record, train_set.modalities), flush=True)

        is_best = metrics["acc"] > best["val_acc"]  # chosen on validation, never on test
        if is_best:
            best = dict(val_acc=metrics["acc"], epoch=epoch)
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     scaler=scaler.state_dict(), epoch=epoch, best=best, rng=rng_state(generator),
                     plan=dict(valued_index=valued_index, phi=phi, copies=copies),
                     args=vars(args), model_config=config)
        save_log(os.path.join(out, "log.jsonl"), log)
        if is_best:
            save_checkpoint(os.path.join(out, "best.pt"), state)
        save_checkpoint(os.path.join(out, "last.pt"), state)

    # the test split is read once, for the checkpoint chosen on validation
    best_state = load_checkpoint(os.path.join(out, "best.pt"), config)
    model.load_state_dict(best_state["model"])
    test_loader = DataLoader(splits["test"], shuffle=False, **loader_kwargs)
    test = evaluate(model, test_loader, device, args.amp)
    _, test_phi = valuate(model, test_loader, device, args.amp)
    results = dict(best_epoch=best_state["epoch"], val_acc=best_state["best"]["val_acc"],
                   test_acc=test["acc"], test_map=test["map"], test_acc_per_modality=test["acc_per_modality"],
                   test_mean_phi=test_phi.mean(0).tolist(), modalities=list(train_set.modalities),
                   train_seconds=sum(r["seconds"] for r in log))
    save_json(os.path.join(out, "results.json"), results)
    names = train_set.modalities
    print(f"best epoch {results['best_epoch']} (val acc {100 * results['val_acc']:.2f})")
    print(f"test acc {100 * test['acc']:.2f}  mAP {100 * test['map']:.2f}")
    print("test acc per modality: " + ", ".join(f"{m} {100 * a:.2f}" for m, a in zip(names, test["acc_per_modality"])))
    print("mean contribution on test: " + ", ".join(f"{m} {p:.3f}" for m, p in zip(names, results["test_mean_phi"])))
    return results


def eval_only(args, given=()):
    """Evaluate a saved model on --eval-split and write a CSV of per-sample valuation."""
    if args.checkpoint is None:
        raise TrainingError("--eval-only needs --checkpoint PATH")
    checkpoint = load_checkpoint(args.checkpoint)
    saved = checkpoint_args(checkpoint, args, given, EVAL_OVERRIDES)
    device = select_device(saved.gpu)
    splits = build_datasets(saved)
    dataset = splits["train_eval" if args.eval_split == "train" else args.eval_split]
    check_config(checkpoint, model_config(saved, dataset), args.checkpoint)
    model = build_model(saved, dataset).to(device)
    model.load_state_dict(checkpoint["model"])
    loader = DataLoader(dataset, shuffle=False, **loader_settings(saved, device))
    metrics = evaluate(model, loader, device, saved.amp)
    index, phi, prediction = valuate(model, loader, device, saved.amp, with_predictions=True)

    out = os.path.dirname(os.path.abspath(args.checkpoint))
    csv_path = os.path.join(out, f"valuation_{args.eval_split}.csv")

    def write(f):
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["id", "label", "prediction"] + [f"phi_{m}" for m in dataset.modalities])
        labels = dataset.labels[index]
        for k in range(len(index)):
            writer.writerow([dataset.sample_ids[index[k]], labels[k].item(), prediction[k].item()]
                            + [f"{p:.4f}" for p in phi[k].tolist()])
        f.write(text.getvalue().encode())

    write_atomic(csv_path, write)
    results = dict(split=args.eval_split, checkpoint=os.path.abspath(args.checkpoint), epoch=checkpoint["epoch"],
                   acc=metrics["acc"], map=metrics["map"], acc_per_modality=metrics["acc_per_modality"],
                   mean_phi=phi.mean(0).tolist(), modalities=list(dataset.modalities))
    save_json(os.path.join(out, f"eval_{args.eval_split}.json"), results)
    print(f"{args.eval_split} acc {100 * metrics['acc']:.2f}  mAP {100 * metrics['map']:.2f}  per modality: "
          + ", ".join(f"{m} {100 * a:.2f}" for m, a in zip(dataset.modalities, metrics["acc_per_modality"])))
    print(f"per-sample valuation written to {csv_path}")
    return results


def given_flags(parser, argv):
    """Names of the flags given on the command line (as opposed to left at their defaults)."""
    unset = object()
    probe = argparse.Namespace(**{action.dest: unset for action in parser._actions})
    parser.parse_args(argv, namespace=probe)
    return [key for key, value in vars(probe).items() if value is not unset]


def one_line(error):
    """The message of `error`; for one re-raised from a DataLoader worker, the original's last line."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    try:
        if args.eval_only:
            return eval_only(args, given)
        if args.resume is None:
            args = resolve_args(args)
            if args.out is None:
                args.out = os.path.join("runs", f"{args.dataset}-{args.mode}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
        return train(args, given)
    except (TrainingError, data.DataError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()

"""
Datasets for multimodal training with sample-level modality valuation (Wei et al., CVPR 2024).

Every dataset returns `(inputs, label, index)` per item, `inputs` being a tuple with one tensor per
modality, and describes itself with `modalities`, `input_specs` (kind, channels) per modality,
`num_classes`, `class_names`, `classes_inferred_from` (None where the class count is known, else what it
was inferred from), `sample_ids`, `labels` and `skipped`. `build_dataset` builds one split, `build_splits`
the four a run needs: train, train_eval (the same listing with evaluation transforms), val and test.

- ResampledDataset (first section): the re-sampled training epoch D^rs of Algorithms 1 and 2, the original
  samples plus uni-modal copies, each item carrying a mask of the modalities it keeps.
- mfeat: UCI Multiple Features, six views of 2,000 handwritten digits, bundled as data/mfeat.npz
  (build it with `python data.py --build-mfeat CSV_DIR`). No download, runs on a CPU.
- synthetic: image-like modalities generated in memory, with knobs for dataset-level imbalance
  (`strength`) and sample-level imbalance (`sample_discrepancy`).
- ks, mmdebiased, ucf101, cremad: clips on disk, in the layouts described in each builder's docstring, read
  by one clip dataset (`Clips`) with one small reader per modality kind: `SpectrogramReader` (.npy),
  `FrameReader` (RGB JPEG frames) and `FlowReader` (u / v grayscale JPEGs). Frame transforms are built once
  per dataset. Items stack into batches: the spectrograms of a dataset must share one shape (one of another
  shape stops with both files and shapes), and the frames of a clip are brought to its first frame's size.
  List files are read as UTF-8; a clip listed twice, or a label outside the data set's classes, stops with
  the file and line.
"""

import argparse
import copy
import json
import os
import re
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, RandomSampler, Sampler
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2

DATASETS = ("mfeat", "ks", "mmdebiased", "ucf101", "cremad", "synthetic")
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Missing, malformed or inconsistent data; the message names the file or argument at fault."""


def check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


# ----------------------------------------------------------------------------------------------
# The re-sampled epoch D^rs (Algorithm 1 line 10, Algorithm 2 line 12)

class ResampledDataset(Dataset):
    """The original samples, then one uni-modal copy per (copy_index[j], copy_modality[j]).

    Items are (inputs, label, index, mask), mask a BoolTensor[n] of the modalities kept: all True for
    the originals, one-hot at copy_modality[j] for copy j. The inputs are the base sample's, untouched:
    the model applies the mask. `index` is the base sample's index, for originals and copies alike."""

    def __init__(self, base, copy_index, copy_modality):
        copy_index, copy_modality = torch.as_tensor(copy_index).long(), torch.as_tensor(copy_modality).long()
        n = len(base.modalities)
        if copy_index.dim() != 1 or copy_index.shape != copy_modality.shape:
            raise ValueError(f"copy_index and copy_modality must be 1-D and of equal length, got shapes "
                             f"{tuple(copy_index.shape)} and {tuple(copy_modality.shape)}")
        if len(copy_index) and (copy_index.min() < 0 or copy_index.max() >= len(base)):
            raise ValueError(f"copy_index must lie in [0, {len(base)}), got values from "
                             f"{copy_index.min().item()} to {copy_index.max().item()}")
        if len(copy_modality) and (copy_modality.min() < 0 or copy_modality.max() >= n):
            raise ValueError(f"copy_modality must lie in [0, {n}), got values from "
                             f"{copy_modality.min().item()} to {copy_modality.max().item()}")
        self.base, self.copy_index, self.copy_modality = base, copy_index, copy_modality
        self.modalities = base.modalities

    def __len__(self):
        return len(self.base) + len(self.copy_index)

    def __getitem__(self, k):
        if k < 0 or k >= len(self):
            raise IndexError(f"index {k} out of range for a re-sampled set of {len(self)} items")
        n = len(self.modalities)
        if k < len(self.base):
            inputs, label, index = self.base[k]
            return inputs, label, index, torch.ones(n, dtype=torch.bool)
        j = k - len(self.base)
        inputs, label, index = self.base[self.copy_index[j].item()]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[self.copy_modality[j]] = True
        return inputs, label, index, mask


class TrainingBatches(Sampler):
    """The batches of one epoch of D^rs, as lists of item indices: torch's BatchSampler over
    RandomSampler(dataset, generator=generator), the shuffle of DataLoader(shuffle=True, generator=generator),
    except that a batch in which some modality is kept by the rows of a single sample (one row, or a sample with
    its own uni-modal copy) is merged with the next one (the last with the one before). So every encoder that runs
    in a training step normalises over at least two samples: BatchNorm never falls back on its running statistics,
    which after a short warm-up are barely estimated, nor on the zero variance of one sample's duplicated 1 x 1
    features. The originals keep every modality, so merging ends, and batches rarely grow (a shuffled batch of 64
    almost always holds several originals). Use as DataLoader(dataset, batch_sampler=TrainingBatches(...),
    generator=generator); len() is exact once the first batch has been drawn.

    Under torchrun every process draws the same batches (the same generator, seeded alike) and trains on its share,
    batches rank, rank + world_size, ...: the epoch is covered once, a few batches repeated so that every process
    takes as many steps (as DistributedSampler pads), and a new shuffle each epoch as the generator moves on."""

    def __init__(self, dataset, batch_size, generator=None, rank=0, world_size=1):
        n = len(dataset.modalities)
        self.masks = torch.cat([torch.ones(len(dataset.base), n, dtype=torch.bool),
                                F.one_hot(dataset.copy_modality, n).bool()])  # [M, n], each item's mask
        self.samples = torch.cat([torch.arange(len(dataset.base)), dataset.copy_index])  # [M], each item's sample
        self.sampler = RandomSampler(dataset, generator=generator)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.batches = None

    def one_sample_keeps_a_modality(self, rows):
        kept, samples = self.masks[rows], self.samples[rows]
        return any(len(set(samples[kept[:, i]].tolist())) == 1 for i in range(kept.shape[1]))

    def __iter__(self):
        order = list(self.sampler)
        batches, pending = [], []
        for start in range(0, len(order), self.batch_size):
            pending += order[start:start + self.batch_size]
            if not self.one_sample_keeps_a_modality(pending):
                batches.append(pending)
                pending = []
        while pending and batches:  # the last rows still leave a modality to one sample: join the batches before
            pending = batches.pop() + pending
            if not self.one_sample_keeps_a_modality(pending):
                break
        batches = batches + [pending] if pending else batches
        # every process takes as many steps: the first batches again, round after round if there are fewer batches
        # than processes
        batches += [batches[k % len(batches)] for k in range(-len(batches) % self.world_size)]
        self.batches = batches[self.rank::self.world_size]
        yield from self.batches  # a generator, as BatchSampler: the shuffle is drawn at the first batch

    def __len__(self):
        if self.batches is not None:
            return len(self.batches)
        return -(-len(self.samples) // (self.batch_size * self.world_size))


# ----------------------------------------------------------------------------------------------
# Fixed splits

def stratified_split(labels, fractions, seed):
    """Split sample indices class by class into len(fractions) parts of the given fractions.
    labels: LongTensor[N]. Returns one sorted LongTensor of indices per part; the last part takes
    what rounding leaves over. Fixed by `seed` alone (a torch.Generator, stable across runs)."""
    generator = torch.Generator().manual_seed(seed)
    parts = [[] for _ in fractions]
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        start = 0
        for p, fraction in enumerate(fractions):
            stop = len(members) if p == len(fractions) - 1 else start + round(fraction * len(members))
            parts[p].append(members[start:stop])
            start = stop
    return [torch.sort(torch.cat(part)).values for part in parts]


VAL_FRACTION, VAL_SPLIT_SEED = 0.1, 2024  # validation carved from train where a data set has none


def carve_validation(labels, groups, fraction=VAL_FRACTION, seed=VAL_SPLIT_SEED):
    """Which samples of a training list to hold out for validation: per class, round(fraction * number of
    its groups) groups (at least one where a class has two or more), drawn with a fixed seed. A group goes
    whole to one side, so that clips cut from one video (UCF-101's gNN) never straddle train and val."""
    generator = torch.Generator().manual_seed(seed)
    held_out = set()
    for label in sorted(set(labels)):
        class_groups = sorted({g for g, y in zip(groups, labels) if y == label})
        count = max(1, round(fraction * len(class_groups))) if len(class_groups) > 1 else 0
        order = torch.randperm(len(class_groups), generator=generator)[:count].tolist()
        held_out.update((label, class_groups[k]) for k in order)
    return [(y, g) in held_out for y, g in zip(labels, groups)]


# ----------------------------------------------------------------------------------------------
# UCI Multiple Features (mfeat): six views of the same 2,000 digits, 200 per class

MFEAT_VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")
MFEAT_DEFAULT_VIEWS = ("pix", "mor")  # a strong view (pixels) with a weak one (6 morphological features)
MFEAT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mfeat.npz")
MFEAT_SPLIT_SEED = 2024  # the train / val / test split is fixed, whatever the run's --seed
MFEAT_FRACTIONS = (0.6, 0.2, 0.2)  # train / val / test, per class


def build_mfeat_npz(csv_dir, out_path):
    """Convert the six UCI mfeat CSVs (`csv_dir/mfeat-<view>.csv`: a header row, then one row per digit,
    the last column the label) into one compressed float32 .npz with one array per view and `labels`."""
    arrays, labels = {}, None
    for view in MFEAT_VIEWS:
        path = os.path.join(csv_dir, f"mfeat-{view}.csv")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: mfeat CSV not found (expected mfeat-<view>.csv for views "
                                    f"{', '.join(MFEAT_VIEWS)})")
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
        view_labels = table[:, -1].astype(np.int64)
        if labels is None:
            labels = view_labels
        elif not np.array_equal(labels, view_labels):
            raise DataError(f"{path}: labels differ from those of mfeat-{MFEAT_VIEWS[0]}.csv (rows out of order?)")
        arrays[view] = table[:, :-1].astype(np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    np.savez_compressed(out_path, labels=labels, **arrays)


class MfeatDataset(Dataset):
    """UCI Multiple Features: one "vector" modality per chosen view, in the order given.
    The split is stratified 60/20/20 per class from `split_seed` (fixed by default, whatever the run's seed;
    `test_fraction` moves samples between train and test, validation keeping its 20 %); each view is standardised
    with the train split's mean and std (features with zero std are only centred).

    degrade > 0 builds sample-level imbalance at dataset-level balance (like MM-Debiased): in every sample one
    view, drawn uniformly, is blended with Gaussian noise, x <- (1 - s) x + s noise, at a per-sample strength
    s ~ U(0, degrade). The draw is fixed for the data set (seeded by split_seed, not the run's seed), so every run
    sees the same corruption; `degraded_view` and `degrade_strength` record it per sample."""

    def __init__(self, split, views=MFEAT_DEFAULT_VIEWS, path=MFEAT_PATH, degrade=0.0, split_seed=MFEAT_SPLIT_SEED,
                 test_fraction=MFEAT_FRACTIONS[2]):
        check_split(split)
        if isinstance(views, str):
            views = tuple(v for v in views.split(",") if v)
        views = tuple(views)
        unknown = [v for v in views if v not in MFEAT_VIEWS]
        if not views or unknown or len(set(views)) != len(views):
            raise ValueError(f"views must be distinct names from {', '.join(MFEAT_VIEWS)}, got {views!r}")
        if not os.path.isfile(path):
            raise DataError(f"{path}: mfeat data not found (build it with `python data.py --build-mfeat CSV_DIR`)")
        with np.load(path) as archive:
            missing = [key for key in ("labels",) + views if key not in archive.files]
            if missing:
                raise DataError(f"{path}: arrays {missing} missing (expected labels and the views {MFEAT_VIEWS})")
            all_labels = torch.from_numpy(archive["labels"]).long()
            all_features = [torch.from_numpy(archive[v]).float() for v in views]
        if not 0.0 < test_fraction < 1.0 - MFEAT_FRACTIONS[1]:
            raise ValueError(f"test_fraction must be in (0, {1.0 - MFEAT_FRACTIONS[1]:g}), got {test_fraction}")
        fractions = MFEAT_FRACTIONS if test_fraction == MFEAT_FRACTIONS[2] else \
            (1.0 - MFEAT_FRACTIONS[1] - test_fraction, MFEAT_FRACTIONS[1], test_fraction)
        parts = stratified_split(all_labels, fractions, split_seed)
        train_rows, rows = parts[0], parts[SPLITS.index(split)]
        self.features = []  # one [N, D_view] tensor per view
        for x in all_features:
            mean, std = x[train_rows].mean(0), x[train_rows].std(0)
            std = torch.where(std > 1e-8, std, torch.ones_like(std))  # constant feature: centre only
            self.features.append((x[rows] - mean) / std)
        if not 0.0 <= degrade <= 1.0:
            raise ValueError(f"degrade must be in [0, 1], got {degrade}")
        generator = torch.Generator().manual_seed(split_seed + 1)
        num_all = len(all_labels)
        self.degraded_view = torch.randint(len(views), (num_all,), generator=generator)[rows]  # [N]
        self.degrade_strength = (degrade * torch.rand(num_all, generator=generator))[rows]  # [N]
        if degrade > 0:
            for v, x in enumerate(all_features):
                noise = torch.randn(num_all, x.shape[1], generator=generator)[rows]  # [N, D_view]
                s = (self.degrade_strength * (self.degraded_view == v)).unsqueeze(1)  # [N, 1]
                self.features[v] = (1 - s) * self.features[v] + s * noise
        self.modalities = list(views)
        self.input_specs = [("vector", x.shape[1]) for x in self.features]
        self.labels = all_labels[rows]
        self.num_classes = 10
        self.class_names = [str(c) for c in range(10)]
        self.sample_ids = [f"mfeat-{row + 1:04d}" for row in rows.tolist()]
        self.classes_inferred_from = None
        self.rows = rows  # row of each sample in the CSV files (0-based, header excluded)
        self.skipped = []

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return tuple(x[i] for x in self.features), self.labels[i].item(), i


# ----------------------------------------------------------------------------------------------
# mfeat with one weak view per sample: a sample-level benchmark (the paper's MM-Debiased setting, Table 2)

MFEAT_SAMPLE_LEVEL_VIEWS = ("fac", "pix")  # each tells all ten digits alone (about 97 % on validation, no 6/9 mix-up)


def balanced_weak_views(labels, num_views, generator):
    """Which view is the weak one of each sample, weak [N] long: within every class the samples, in an order drawn
    from `generator`, take the views in turn, so each view is weak in an equal share of every class (to one
    sample): balanced over the data set, and which view is weak varies from sample to sample."""
    weak = torch.empty(len(labels), dtype=torch.long)
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        weak[members] = torch.arange(len(members)) % num_views
    return weak


def weaken(x, signal, noise):
    """A standardised view x [N, D] that keeps the share `signal` of its values: signal * x + sqrt(1 - signal^2) *
    noise, noise [N, D] standard normal, so that every feature keeps unit variance and only the information drops."""
    return signal * x + (1.0 - signal ** 2) ** 0.5 * noise


class MfeatWeakViewDataset(MfeatDataset):
    """Sample-level imbalance at dataset-level balance on real data (like MM-Debiased, Sec. 4.3): in every sample
    one of the views, `degraded_view` [N] (balanced_weak_views, drawn per split from split_seed), is weakened to
    `weak_signal` of its signal (weaken), the others to `strong_signal` (1: left as they are). Each view alone is then
    about as accurate as the other over the set, while per sample one is much better; the weak view still carries the
    class (it is less informative, not noise). strong_signal < 1 weakens the strong views too, so that no view alone
    is nearly always right and the joint decision needs both; weak_signal from near 0 up to strong_signal spans the
    per-sample imbalance from "the weak view is nearly noise" to "the views are equal" (equal shares weaken every
    view of every sample alike: `degraded_view` then names no weaker view). The training split (augment=True) draws
    the noise anew every time a sample is read, so no model can learn one fixed corruption of a training sample and
    the training-set valuation keeps finding the weak views; evaluation (train_eval, val, test: augment False) reads
    one fixed draw. `degrade_strength` [N] is 1 - weak_signal for every sample (what pick_examples in reproduce.py
    reads)."""

    def __init__(self, split, views=MFEAT_SAMPLE_LEVEL_VIEWS, path=MFEAT_PATH, weak_signal=0.2, strong_signal=1.0,
                 split_seed=MFEAT_SPLIT_SEED, test_fraction=MFEAT_FRACTIONS[2], augment=False):
        super().__init__(split, views=views, path=path, split_seed=split_seed, test_fraction=test_fraction)
        if len(self.features) < 2 or not 0.0 < weak_signal < 1.0 or not weak_signal <= strong_signal <= 1.0:
            raise ValueError(f"a weak view per sample needs two or more views, weak_signal in (0, 1) and "
                             f"strong_signal in [weak_signal, 1], got {len(self.features)} views, weak_signal "
                             f"{weak_signal} and strong_signal {strong_signal}")
        generator = torch.Generator().manual_seed(split_seed + 2 + SPLITS.index(split))
        self.degraded_view = balanced_weak_views(self.labels, len(self.features), generator)
        self.degrade_strength = torch.full((len(self.labels),), 1.0 - weak_signal)
        self.weak_signal, self.strong_signal, self.augment = weak_signal, strong_signal, augment
        self.clean = self.features  # the views before weakening, re-weakened per read in training
        self.features = [torch.where((self.degraded_view == v).unsqueeze(1),
                                     weaken(x, weak_signal, torch.randn(x.shape, generator=generator)), x)
                         for v, x in enumerate(self.clean)]
        if strong_signal < 1:  # drawn after the weak views' noise, which stays that of strong_signal 1
            self.features = [torch.where((self.degraded_view == v).unsqueeze(1), x,
                                         weaken(x, strong_signal, torch.randn(x.shape, generator=generator)))
                             for v, x in enumerate(self.features)]

    def __getitem__(self, i):
        if not self.augment:
            return super().__getitem__(i)
        weak = int(self.degraded_view[i])
        inputs = tuple(weaken(x[i], self.weak_signal if v == weak else self.strong_signal, torch.randn(x.shape[1]))
                       if v == weak or self.strong_signal < 1 else x[i]
                       for v, x in enumerate(self.clean))  # torch's global generator, as the videos' augmentation
        return inputs, self.labels[i].item(), i


# ----------------------------------------------------------------------------------------------
# Synthetic: image-like modalities with controllable dataset- and sample-level imbalance

SYNTHETIC_SIZES = dict(train=600, val=200, test=200)
SYNTHETIC_KINDS = {"spectrogram": 1, "image": 3}  # kind -> channels


def split_seed(seed, split):
    """A seed for one split derived from the run seed and the split name (stable across Python runs)."""
    return zlib.crc32(f"{seed}/{split}".encode())


def synthetic_patterns(kind, num_classes, size, generator):
    """One fixed, smooth pattern per class, scaled to unit RMS: [K, C, size, size].
    spectrogram: a class-specific frequency profile held over time (horizontal bands);
    image: a class-specific low-resolution colour layout, upsampled."""
    channels = SYNTHETIC_KINDS[kind]
    if kind == "spectrogram":
        profile = torch.randn(num_classes, 1, 8, 1, generator=generator)
        patterns = F.interpolate(profile, size=(size, 1), mode="bilinear", align_corners=False).expand(-1, -1, -1, size)
    else:
        layout = torch.randn(num_classes, channels, 4, 4, generator=generator)
        patterns = F.interpolate(layout, size=(size, size), mode="bilinear", align_corners=False)
    return patterns / patterns.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()


class SyntheticDataset(Dataset):
    """Noise plus a class pattern per modality: x_m = strength_m * pattern_m[y] + N(0, 1).

    `strength` (one scale per modality) sets the dataset-level imbalance, as in KS where audio
    dominates. `sample_discrepancy` sets the sample-level imbalance: in that fraction of samples only one
    modality, drawn per sample from `carrier_probs`, carries the class and the others are pure noise,
    as in MM-Debiased. `carrier[i]` records that modality (-1: every modality carries the class).
    Patterns depend on `seed` only; samples on `seed` and the split name."""

    def __init__(self, split, seed=0, num_modalities=2, kinds=None, size=32, num_classes=4, strength=1.0,
                 sample_discrepancy=0.5, carrier_probs=None, train_size=SYNTHETIC_SIZES["train"],
                 val_size=SYNTHETIC_SIZES["val"], test_size=SYNTHETIC_SIZES["test"]):
        check_split(split)
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be at least 1, got {num_modalities}")
        if kinds is None:
            kinds = tuple(("spectrogram", "image")[m % 2] for m in range(num_modalities))
        kinds = tuple(kinds)
        if len(kinds) != num_modalities or any(k not in SYNTHETIC_KINDS for k in kinds):
            raise ValueError(f"kinds must be {num_modalities} names from {', '.join(SYNTHETIC_KINDS)}, got {kinds!r}")
        strength = torch.tensor([float(strength)] * num_modalities if np.isscalar(strength) else strength,
                                dtype=torch.float32)
        if strength.shape != (num_modalities,):
            raise ValueError(f"strength must be a number or {num_modalities} numbers, got {strength.tolist()}")
        if not 0.0 <= sample_discrepancy <= 1.0:
            raise ValueError(f"sample_discrepancy must be in [0, 1], got {sample_discrepancy}")
        carrier_probs = torch.full((num_modalities,), 1.0 / num_modalities) if carrier_probs is None \
            else torch.tensor(carrier_probs, dtype=torch.float64)
        if carrier_probs.shape != (num_modalities,) or (carrier_probs < 0).any() or carrier_probs.sum() <= 0:
            raise ValueError(f"carrier_probs must be {num_modalities} non-negative numbers with a positive sum, "
                             f"got {carrier_probs.tolist()}")
        if size < 1 or num_classes < 2:
            raise ValueError(f"size must be >= 1 and num_classes >= 2, got size={size}, num_classes={num_classes}")
        num_samples = dict(train=train_size, val=val_size, test=test_size)[split]
        if num_samples < 1:
            raise ValueError(f"{split}_size must be at least 1, got {num_samples}")

        pattern_generator = torch.Generator().manual_seed(split_seed(seed, "patterns"))
        patterns = [synthetic_patterns(kind, num_classes, size, pattern_generator) for kind in kinds]
        generator = torch.Generator().manual_seed(split_seed(seed, split))
        self.labels = torch.randint(num_classes, (num_samples,), generator=generator)
        # the round(sample_discrepancy * N) samples whose class lives in one modality only
        self.carrier = torch.full((num_samples,), -1, dtype=torch.long)
        uni = torch.randperm(num_samples, generator=generator)[:round(sample_discrepancy * num_samples)]
        if len(uni) > 0:
            self.carrier[uni] = torch.multinomial(carrier_probs, len(uni), replacement=True, generator=generator)
        self.inputs = []  # one [N, C, size, size] tensor per modality
        for m, pattern in enumerate(patterns):
            carries = ((self.carrier == -1) | (self.carrier == m)).float().view(-1, 1, 1, 1)
            noise = torch.randn((num_samples,) + pattern.shape[1:], generator=generator)
            self.inputs.append(strength[m] * carries * pattern[self.labels] + noise)
        self.modalities = [f"{kind}{m}" for m, kind in enumerate(kinds)]
        self.input_specs = [("image", SYNTHETIC_KINDS[kind]) for kind in kinds]
        self.num_classes = num_classes
        self.class_names = [str(c) for c in range(num_classes)]
        self.classes_inferred_from = None
        self.sample_ids = [f"synthetic-{split}-{i:05d}" for i in range(num_samples)]
        self.skipped = []

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return tuple(x[i] for x in self.inputs), self.labels[i].item(), i


# ----------------------------------------------------------------------------------------------
# Clip files: spectrograms (.npy) and frame folders (JPEG)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FLOW_MEAN, FLOW_STD = (0.5, 0.5), (0.226, 0.226)  # TSN's flow normalisation: centre 128, ImageNet's mean std
NUM_SEGMENTS = 3  # frames per clip, one per segment


def frame_positions(count, augment):
    """0-based indices of the frames to read from a clip of `count` frames: one per segment of
    NUM_SEGMENTS near-equal segments [i*F//3, (i+1)*F//3) (F = 10: [0, 3), [3, 6), [6, 10)).
    Evaluation takes each segment's middle (F = 10: 1, 4, 7, i.e. frame_00002, _00005, _00008);
    training a random frame of each segment. With fewer frames than segments, a segment that would be
    empty takes the frame at its start, so frames repeat: F = 2 gives 0, 0, 1 and F = 1 gives 0, 0, 0."""
    positions = []
    for i in range(NUM_SEGMENTS):
        start = i * count // NUM_SEGMENTS
        stop = max((i + 1) * count // NUM_SEGMENTS, start + 1)
        positions.append(torch.randint(start, stop, ()).item() if augment else (start + stop - 1) // 2)
    return positions


def missing_frames(folder):
    """Why `folder` cannot give frames (missing or without .jpg files), or None."""
    if not os.path.isdir(folder):
        return f"frame folder {folder} not found"
    if not any(name.lower().endswith((".jpg", ".jpeg")) for name in os.listdir(folder)):
        return f"frame folder {folder} holds no .jpg frames"
    return None


def list_frames(folder):
    """Sorted JPEG file names in `folder` (names must be zero-padded, e.g. frame_00001.jpg)."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: frame folder not found")
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith((".jpg", ".jpeg")))
    if not names:
        raise DataError(f"{folder}: frame folder holds no .jpg frames")
    return names


def read_jpeg(path, mode):
    """uint8 [C, H, W], decoded by torchvision (C = 3 for ImageReadMode.RGB, 1 for GRAY)."""
    try:
        return decode_jpeg(read_file(path), mode=mode)
    except RuntimeError as error:
        reason = re.sub(r"^.*\.cpp:\d+, ", "", str(error).splitlines()[0])  # drop torchvision's source location
        raise DataError(f"{path}: cannot read JPEG ({reason})") from None


def read_npy(path, shape_only=False):
    """The array in a .npy spectrogram file, or with shape_only its shape, read from the header alone
    (a third of the time of a memory-mapped np.load). Fails with the path."""
    try:
        if not shape_only:
            return np.load(path)
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                return np.lib.format.read_array_header_1_0(f)[0]
            return np.lib.format.read_array_header_2_0(f)[0]
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path}: cannot read spectrogram ({error})") from None


def same_size(frames):
    """Frames [C, H, W] of one clip, those whose size differs from the first's resized to it (bilinear,
    antialiased), so that they stack and take one crop. Frames of the usual clip share a size: no copy then."""
    size = list(frames[0].shape[-2:])
    return [frame if list(frame.shape[-2:]) == size else v2.functional.resize(frame, size, antialias=True)
            for frame in frames]


def stack_frames(frames):
    """RGB frames, uint8 [C, H, W] each as decode_jpeg returns them (a CHW view of HWC memory) -> [T, C, H, W]
    in channels-last memory. torch.stack of the CHW views would transpose every pixel into planar order; the
    channels-last stack is a plain copy, and the uint8 resize kernels run fastest on channels-last input."""
    return torch.stack([frame.permute(1, 2, 0) for frame in frames]).permute(0, 3, 1, 2)


class FrameTransform:
    """uint8 frames [T, C, H, W] -> float [C, T, S, S], S = image_size; one crop and flip for all T.
    Train (augment=True): RandomResizedCrop + horizontal flip; eval: Resize((S, S)); then normalised by
    mean / std. Cropping and resizing run on uint8, before the conversion to float. Built once per dataset.
    flow=True: channel 0 is horizontal flow, stored as 255 - u when mirrored (zero motion at 127.5)."""

    def __init__(self, image_size, mean, std, flow=False):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.crop = v2.RandomResizedCrop(image_size, antialias=True)
        self.resize = v2.Resize((image_size, image_size), antialias=True)
        # (x / 255 - mean) / std = (x - 255 mean) / (255 std)
        self.shift, self.scale = 255 * torch.tensor(mean).view(-1, 1, 1), 255 * torch.tensor(std).view(-1, 1, 1)
        self.flow = flow

    def __call__(self, frames, augment):
        if augment:
            frames = self.crop(frames)
            if torch.rand(()) < 0.5:
                frames = frames.flip(-1)
                if self.flow:  # mirrored motion: horizontal flow changes sign
                    frames[:, 0] = 255 - frames[:, 0]
        else:
            frames = self.resize(frames)
        # one pass to float in [T, C, S, S] memory order (whatever order the frames came in), normalised in place
        frames = frames.to(torch.float32, memory_format=torch.contiguous_format)
        return frames.sub_(self.shift).div_(self.scale).permute(1, 0, 2, 3)


# ----------------------------------------------------------------------------------------------
# Clips on disk: one reader per modality kind, one clip dataset (ks, mmdebiased, ucf101, cremad)
#
# A reader holds one path per clip and answers missing(i) (why clip i cannot be read, or None),
# keep(kept) (keep those clips) and read(i, augment) (the modality's input tensor of clip i).

class SpectrogramReader:
    """A 2-D float32 .npy per clip -> an "image" [1, H, W]. Every spectrogram of a dataset has one shape,
    since a batch stacks them: keep() reads each file's header and stops at the first of another shape,
    naming both files and shapes ((1024, 128) fbank and (257, 1004) log-spectrogram lists exist)."""
    spec = ("image", 1)

    def __init__(self, paths):
        self.paths = list(paths)
        self.shape = None  # the dataset's spectrogram shape, that of its first clip

    def missing(self, i):
        return None if os.path.isfile(self.paths[i]) else f"spectrogram {self.paths[i]} not found"

    def keep(self, kept):
        self.paths = [self.paths[i] for i in kept]
        self.shape = read_npy(self.paths[0], shape_only=True)
        for path in self.paths:
            self.check_shape(path, read_npy(path, shape_only=True))

    def check_shape(self, path, shape):
        if len(shape) != 2:
            raise DataError(f"{path}: spectrogram must be 2-D (frequency x time), got shape {shape}")
        if shape != self.shape:
            raise DataError(f"{path}: spectrogram of shape {shape}, but {self.paths[0]} has {self.shape}; "
                            f"the spectrograms of a dataset must share one shape")

    def read(self, i, augment):
        path = self.paths[i]
        spectrogram = read_npy(path)
        self.check_shape(path, spectrogram.shape)
        if not np.isfinite(spectrogram).all():
            raise DataError(f"{path}: spectrogram contains NaN or infinite values")
        return torch.from_numpy(spectrogram.astype(np.float32, copy=False)).unsqueeze(0)


class FrameReader:
    """A folder of RGB JPEG frames per clip -> a "video" [3, T, S, S]: T = NUM_SEGMENTS frames chosen by
    frame_positions, brought to one size (same_size), transformed together, ImageNet-normalised."""
    spec = ("video", 3)

    def __init__(self, folders, image_size):
        self.folders = list(folders)
        self.transform = FrameTransform(image_size, IMAGENET_MEAN, IMAGENET_STD)

    def missing(self, i):
        return missing_frames(self.folders[i])

    def keep(self, kept):
        self.folders = [self.folders[i] for i in kept]

    def read(self, i, augment):
        folder = self.folders[i]
        names = list_frames(folder)
        frames = [read_jpeg(os.path.join(folder, names[p]), ImageReadMode.RGB)
                  for p in frame_positions(len(names), augment)]
        return self.transform(stack_frames(same_size(frames)), augment)


class FlowReader:
    """TV-L1 optical flow per clip, u and v as grayscale JPEGs in two folders holding the same file names ->
    a "video" [2, T, S, S] with u in channel 0 and v in channel 1, frames chosen like FrameReader's (on their
    own draw), brought to one size, TSN-normalised; a horizontal flip negates u."""
    spec = ("video", 2)

    def __init__(self, u_folders, v_folders, image_size):
        self.u_folders, self.v_folders = list(u_folders), list(v_folders)
        self.transform = FrameTransform(image_size, FLOW_MEAN, FLOW_STD, flow=True)

    def missing(self, i):
        return missing_frames(self.u_folders[i]) or missing_frames(self.v_folders[i])

    def keep(self, kept):
        self.u_folders = [self.u_folders[i] for i in kept]
        self.v_folders = [self.v_folders[i] for i in kept]

    def read(self, i, augment):
        u_folder, v_folder = self.u_folders[i], self.v_folders[i]
        names = list_frames(u_folder)  # v/ holds the same file names
        positions = frame_positions(len(names), augment)
        planes = same_size([read_jpeg(os.path.join(folder, names[p]), ImageReadMode.GRAY)
                            for p in positions for folder in (u_folder, v_folder)])  # u, v, u, v, ... [1, H, W]
        flow = torch.cat(planes).unflatten(0, (len(positions), 2))  # [T, 2, H, W]
        return self.transform(flow, augment)


def keep_readable(sample_ids, readers, skip_missing, source):
    """Indices of the clips whose files are all there, asking each reader. A missing file raises DataError,
    or with skip_missing is listed in the returned `skipped` as (sample id, reason)."""
    kept, skipped = [], []
    for i, sample_id in enumerate(sample_ids):
        reason = next(filter(None, (reader.missing(i) for reader in readers)), None)
        if reason is None:
            kept.append(i)
        elif skip_missing:
            skipped.append((sample_id, reason))
        else:
            raise DataError(f"clip {sample_id} listed in {source}: {reason} (skip such clips with skip_missing=True)")
    if not kept:
        raise DataError(f"{source}: no readable clips in this split" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return kept, skipped


class Clips(Dataset):
    """Clips on disk: `readers` maps each modality name to its reader, in order (SpectrogramReader,
    FrameReader, FlowReader); `source` names the list the clips come from. augment=True selects training
    transforms and random frame choice, False evaluation ones; a shallow copy with `augment` switched
    shares the listing (build_splits' train_eval)."""

    def __init__(self, sample_ids, labels, readers, class_names, source, augment=False, skip_missing=False,
                 classes_inferred_from=None):
        kept, self.skipped = keep_readable(sample_ids, list(readers.values()), skip_missing, source)
        for reader in readers.values():
            reader.keep(kept)
        self.readers = list(readers.values())
        self.modalities = list(readers)
        self.input_specs = [reader.spec for reader in self.readers]
        self.sample_ids = [sample_ids[i] for i in kept]
        self.labels = torch.tensor([labels[i] for i in kept], dtype=torch.long)
        self.class_names, self.num_classes = list(class_names), len(class_names)
        self.classes_inferred_from = classes_inferred_from
        self.augment = augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return tuple(reader.read(i, self.augment) for reader in self.readers), self.labels[i].item(), i


# ----------------------------------------------------------------------------------------------
# List files

def read_text_lines(path, what):
    """(line number, stripped line) of the non-blank lines of a UTF-8 text file (a BOM is dropped).
    A byte that is not UTF-8 stops with the file and line: clip names must match the files on disk."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} not found")
    with open(path, "rb") as f:
        raw = f.read().removeprefix(b"\xef\xbb\xbf")
    lines = []
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise DataError(f"{path}:{number}: not UTF-8 text (byte 0x{line[error.start]:02x} at column "
                            f"{error.start + 1}); save the {what} as UTF-8") from None
        if text:
            lines.append((number, text))
    if not lines:
        raise DataError(f"{path}: {what} is empty")
    return lines


def check_entries(entries, num_classes, classes_from):
    """Stop at the first clip of a list [(clip name, label, "path:line")] listed twice or labelled outside
    0..num_classes - 1; `classes_from` says where num_classes comes from."""
    first = {}
    for name, label, where in entries:
        if name in first:
            raise DataError(f"{where}: clip {name} listed twice (first at {first[name]})")
        if not 0 <= label < num_classes:
            raise DataError(f"{where}: clip {name} has label {label}, expected 0..{num_classes - 1} ({classes_from})")
        first[name] = where


def check_root(name, root):
    if root is None:
        raise DataError(f"{name} needs root (the folder holding its clips)")
    if not os.path.isdir(root):
        raise DataError(f"{root}: {name} root folder not found")


# ----------------------------------------------------------------------------------------------
# Kinetics-Sounds

KS_LINE = re.compile(r"(?P<path>.+?)(?:\s+\d+)?\s+(?P<label>-?\d+)")  # '<.../clip name> [<frames>] <label>'
OGM_LINE = re.compile(r"(?P<path>.+),[^,]*,(?P<label>-?\d+)")  # 'id,10,label'


def read_ks_list(path, ogm_format):
    """[(clip name, label, "path:line")] of one KS list. Authors' format: space-separated, the last field
    the label, the one before it the frame count if it is an integer, and all before them a path ending in
    the clip name (which may hold spaces). OGM-GE format: `id,10,label`."""
    pattern = OGM_LINE if ogm_format else KS_LINE
    entries = []
    for number, line in read_text_lines(path, "Kinetics-Sounds list"):
        match = pattern.fullmatch(line)
        name = os.path.basename(match["path"].rstrip("/")) if match else ""
        if not name:
            expected = "'id,10,label'" if ogm_format else "'<path ending in clip name> ... <integer label>'"
            raise DataError(f"{path}:{number}: expected {expected}, got {line!r}")
        entries.append((name, int(match["label"]), f"{path}:{number}"))
    return entries


def read_class_names(path):
    """Class names, one per line, line k naming label k - 1 (root/ks_classes.txt)."""
    names = []
    for number, line in read_text_lines(path, "class name list"):
        if number != len(names) + 1:
            raise DataError(f"{path}:{len(names) + 1}: empty line (line k names label k - 1)")
        if line in names:
            raise DataError(f"{path}:{number}: class name {line!r} repeats line {names.index(line) + 1}")
        names.append(line)
    return names


def build_kinetics_sounds(root, split, list_dir=None, augment=False, image_size=224, skip_missing=False,
                          num_classes=None):
    """Kinetics-Sounds in the authors' layout:
        root/ks_audio/{train,val,test}_1fps_path.txt   lines '<.../clip name> ... <label>'
        root/ks_audio/<split>/<clip name>.npy          spectrogram, (1024, 128) or (257, 1004)
        root/ks_visual/<split>/<clip name>/frame_00001.jpg ...   1 frame per second
        root/ks_classes.txt                            optional: class names, line k naming label k - 1
    With `list_dir` = a folder of OGM-GE lists (`my_train.txt`, `my_val.txt`, `my_test.txt`, lines
    `id,10,label`), the lists come from there and the clips from the same root layout. OGM-GE ships no
    val list: without my_val.txt, val is carved from my_train.txt (VAL_FRACTION per class, fixed seed) and
    train is the rest. The classes are those of ks_classes.txt, else num_classes numbered ones, else as many
    as the largest label over all lists + 1 (31 for the authors' lists; `classes_inferred_from` says so).
    A label outside the classes, or a clip listed twice in one list, stops with the file and line."""
    check_root("ks", root)
    if list_dir is None:
        lists = {s: os.path.join(root, "ks_audio", f"{s}_1fps_path.txt") for s in SPLITS}
        entries = {s: read_ks_list(path, ogm_format=False) for s, path in lists.items()
                   if s == split or os.path.isfile(path)}
        folder = {s: s for s in SPLITS}
    else:
        if not os.path.isdir(list_dir):
            raise DataError(f"{list_dir}: expected a folder of OGM-GE lists my_train.txt, my_val.txt, my_test.txt")
        lists = {s: os.path.join(list_dir, f"my_{s}.txt") for s in SPLITS}
        carve = split in ("train", "val") and not os.path.isfile(lists["val"])
        needed = "train" if carve else split
        entries = {s: read_ks_list(path, ogm_format=True) for s, path in lists.items()
                   if s == needed or os.path.isfile(path)}
        folder = dict(train="train", val="train" if carve else "val", test="test")
        if carve:
            train_entries = entries.pop("train")
            is_val = carve_validation([y for _, y, _ in train_entries], [n for n, _, _ in train_entries])
            entries["train"] = [e for e, v in zip(train_entries, is_val) if not v]
            entries["val"] = [e for e, v in zip(train_entries, is_val) if v]
            lists["val"] = f"{lists['train']} (validation part)"
            lists["train"] = f"{lists['train']} (training part)"
    all_entries = [entry for split_entries in entries.values() for entry in split_entries]
    classes_path, inferred = os.path.join(root, "ks_classes.txt"), None
    if os.path.isfile(classes_path):
        class_names, classes_from = read_class_names(classes_path), f"the classes of {classes_path}"
        if num_classes is not None and num_classes != len(class_names):
            raise DataError(f"{classes_path}: names {len(class_names)} classes, but num_classes={num_classes}")
    elif num_classes is not None:
        class_names, classes_from = [str(c) for c in range(num_classes)], f"num_classes={num_classes}"
    else:
        _, top, where = max(all_entries, key=lambda entry: entry[1])
        class_names, classes_from = [str(c) for c in range(top + 1)], "labels count from 0"
        unused = top + 1 - len({label for _, label, _ in all_entries})
        inferred = f"the largest label, {top} at {where}" + (f"; {unused} labels have no clip" if unused else "")
    for split_entries in entries.values():
        check_entries(split_entries, len(class_names), classes_from)
    names = [name for name, _, _ in entries[split]]
    readers = dict(audio=SpectrogramReader(os.path.join(root, "ks_audio", folder[split], f"{n}.npy") for n in names),
                   visual=FrameReader((os.path.join(root, "ks_visual", folder[split], n) for n in names), image_size))
    return Clips(names, [label for _, label, _ in entries[split]], readers, class_names, lists[split], augment,
                 skip_missing, inferred)


# ----------------------------------------------------------------------------------------------
# MM-Debiased

MMDEBIASED_SUBSETS = dict(train="training", val="validation", test="testing")


def build_mmdebiased(root, split, split_file=None, augment=False, image_size=224, skip_missing=False,
                     class_names=None):
    """MM-Debiased: the JSON split file of the authors' repository (`split_file`, not bundled)
    {clip_id: {"subset": "training" | "validation" | "testing", "label": "<class name>"}}, clips laid
    out like KS under root:
        root/audio/<clip_id>.npy                     spectrogram
        root/visual/<clip_id>/frame_00001.jpg ...    frames
    Labels are indices into the sorted class names found in the JSON (`classes_inferred_from` says so),
    or into `class_names`. A clip id that appears twice in the JSON stops with the file; one that is no file
    name (a path such as ../../elsewhere, which would be read outside root) stops with the file and line."""
    check_root("mmdebiased", root)
    if split_file is None:
        raise DataError("mmdebiased needs split_file (the MM-Debiased JSON split file)")
    if not os.path.isfile(split_file):
        raise DataError(f"{split_file}: MM-Debiased JSON split file not found")

    def unique_keys(pairs):  # json.load would keep the last of two equal keys (a clip listed twice) silently
        keys = set()
        for key, _ in pairs:
            if key in keys:
                raise DataError(f"{split_file}: {key!r} appears twice in one object (a clip id listed twice?)")
            keys.add(key)
        return dict(pairs)

    try:
        with open(split_file, encoding="utf-8") as f:
            text = f.read()
        table = json.loads(text, object_pairs_hook=unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{split_file}: not valid JSON ({error})") from None
    if not isinstance(table, dict):
        raise DataError(f"{split_file}: expected a JSON object {{clip_id: {{\"subset\": ..., \"label\": ...}}}}")
    for clip_id, entry in table.items():
        if clip_id in ("", ".", "..") or "/" in clip_id or "\0" in clip_id or os.sep in clip_id:
            # a path would be read outside root/audio and root/visual (../../elsewhere, /elsewhere)
            key = re.search(re.escape(json.dumps(clip_id, ensure_ascii=False)) + r"\s*:", text)  # unless escaped
            line = text.count("\n", 0, key.start()) + 1 if key else None
            where = f"{split_file}:{line}" if key else split_file
            raise DataError(f"{where}: clip id {clip_id!r} is not a file name (expected a name under "
                            f"{root}/audio and {root}/visual, without '/', not '.' or '..')")
        if not isinstance(entry, dict) or entry.get("subset") not in MMDEBIASED_SUBSETS.values() \
                or not isinstance(entry.get("label"), str):
            raise DataError(f"{split_file}: clip {clip_id}: expected {{\"subset\": \"training\" | \"validation\" | "
                            f"\"testing\", \"label\": \"<class name>\"}}, got {entry!r}")
    inferred = f"the class names in {split_file}" if class_names is None else None
    names = sorted({entry["label"] for entry in table.values()}) if class_names is None else list(class_names)
    for clip_id, entry in table.items():
        if entry["label"] not in names:
            raise DataError(f"{split_file}: clip {clip_id} has unknown class name {entry['label']!r} "
                            f"(expected one of {', '.join(names)})")
    clip_ids = [c for c, entry in table.items() if entry["subset"] == MMDEBIASED_SUBSETS[split]]
    if not clip_ids:
        raise DataError(f"{split_file}: no clips with subset {MMDEBIASED_SUBSETS[split]!r}")
    readers = dict(audio=SpectrogramReader(os.path.join(root, "audio", f"{c}.npy") for c in clip_ids),
                   visual=FrameReader((os.path.join(root, "visual", c) for c in clip_ids), image_size))
    return Clips(clip_ids, [names.index(table[c]["label"]) for c in clip_ids], readers, names,
                 f"{split_file} ({MMDEBIASED_SUBSETS[split]})", augment, skip_missing, inferred)


# ----------------------------------------------------------------------------------------------
# UCF-101: RGB frames and TV-L1 optical flow

def build_ucf101(root, split, augment=False, image_size=224, skip_missing=False, split_id=1):
    """UCF-101 with the official split files and pre-extracted frames:
        root/splits/classInd.txt, trainlist0<split_id>.txt, testlist0<split_id>.txt
        root/rgb/<v_name>/frame_00001.jpg ...                 RGB frames
        root/flow/u/<v_name>/frame000001.jpg ..., root/flow/v/...   TV-L1 flow, grayscale JPEGs
    Modalities ("rgb", "flow"): rgb a "video" [3, 3, S, S], flow a "video" [2, 3, S, S] (FlowReader).
    UCF-101 has no validation split: val is VAL_FRACTION of the training list's groups (gNN) per class,
    from a fixed seed, and train is the rest."""
    check_root("ucf101", root)
    if split_id not in (1, 2, 3):
        raise ValueError(f"split_id must be 1, 2 or 3, got {split_id}")
    class_path = os.path.join(root, "splits", "classInd.txt")
    class_names = []
    for number, line in read_text_lines(class_path, "UCF-101 class index"):
        fields = line.split()
        if len(fields) != 2 or fields[0] != str(len(class_names) + 1):
            raise DataError(f"{class_path}:{number}: expected '{len(class_names) + 1} <ClassName>', got {line!r}")
        class_names.append(fields[1])
    list_path = os.path.join(root, "splits", f"{'test' if split == 'test' else 'train'}list0{split_id}.txt")
    entries = []
    for number, line in read_text_lines(list_path, "UCF-101 split file"):
        fields = line.split()  # 'Class/v_Class_gNN_cMM.avi [label]'
        class_name, _, video = fields[0].partition("/")
        if class_name not in class_names:
            raise DataError(f"{list_path}:{number}: unknown class name {class_name!r} (not in {class_path})")
        label = class_names.index(class_name)
        if len(fields) > 1 and fields[1] not in [str(k) for k in range(1, len(class_names) + 1)]:
            raise DataError(f"{list_path}:{number}: label {fields[1]} out of range, expected 1..{len(class_names)}")
        if len(fields) > 1 and fields[1] != str(label + 1):
            raise DataError(f"{list_path}:{number}: label {fields[1]} disagrees with class {class_name}, "
                            f"number {label + 1} in {class_path}")
        entries.append((os.path.splitext(video)[0], label, f"{list_path}:{number}"))
    check_entries(entries, len(class_names), f"the classes of {class_path}")
    source = list_path
    if split != "test":
        groups = [re.sub(r"_c\d+$", "", v) for v, _, _ in entries]  # v_Class_gNN_cMM -> v_Class_gNN
        is_val = carve_validation([label for _, label, _ in entries], groups)
        entries = [entry for entry, v in zip(entries, is_val) if v == (split == "val")]
        source = f"{list_path} ({'validation' if split == 'val' else 'training'} part)"
    videos = [video for video, _, _ in entries]
    readers = dict(rgb=FrameReader((os.path.join(root, "rgb", v) for v in videos), image_size),
                   flow=FlowReader((os.path.join(root, "flow", "u", v) for v in videos),
                                   (os.path.join(root, "flow", "v", v) for v in videos), image_size))
    return Clips(videos, [label for _, label, _ in entries], readers, class_names, source, augment, skip_missing)


# ----------------------------------------------------------------------------------------------
# CREMA-D

CREMAD_EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")  # labels 0..5, OGM-GE's order


def build_cremad(root, split, augment=False, image_size=224, skip_missing=False):
    """CREMA-D (6 emotions, actors reading sentences) as its pre-processing script lays it out:
        root/{train,val,test}.csv                 lines '<clip>,<EMO>', no header (1001_DFA_ANG_XX,ANG)
        root/audio/<clip>.npy                     spectrogram, one shape for the whole set
        root/visual/<clip>/frame_00001.jpg ...    1 frame per second
    Modalities ("audio", "visual") as for KS; labels 0..5 for NEU, HAP, SAD, FEA, DIS, ANG (OGM-GE's order).
    Clips last about 1.3-5 s, so 2-5 frames (at least 3 with preprocess.py --min-frames 3, PMR's recipe): where a
    clip has fewer frames than the NUM_SEGMENTS segments, frames repeat (frame_positions; 2 frames give frames
    1, 1, 2)."""
    check_root("cremad", root)
    path = os.path.join(root, f"{split}.csv")
    entries = []
    for number, line in read_text_lines(path, "CREMA-D list"):
        name, _, emotion = (field.strip() for field in line.rpartition(","))
        if not name or emotion not in CREMAD_EMOTIONS:
            raise DataError(f"{path}:{number}: expected '<clip>,<EMO>' with EMO one of {', '.join(CREMAD_EMOTIONS)}, "
                            f"got {line!r}")
        entries.append((name, CREMAD_EMOTIONS.index(emotion), f"{path}:{number}"))
    check_entries(entries, len(CREMAD_EMOTIONS), "CREMA-D's 6 emotions")
    names = [name for name, _, _ in entries]
    readers = dict(audio=SpectrogramReader(os.path.join(root, "audio", f"{n}.npy") for n in names),
                   visual=FrameReader((os.path.join(root, "visual", n) for n in names), image_size))
    return Clips(names, [label for _, label, _ in entries], readers, CREMAD_EMOTIONS, path, augment, skip_missing)


# ----------------------------------------------------------------------------------------------
# Entry points

def build_dataset(name, split, *, root=None, split_file=None, list_dir=None, views=None, augment=False,
                  skip_missing=False, seed=0, **options):
    """The `split` ("train", "val" or "test") of data set `name` (one of DATASETS).
    augment=True selects training transforms and random frame choice; False, evaluation transforms.
    `views` (mfeat only) picks and orders the views; `split_file` is MM-Debiased's JSON split, `list_dir` a folder
    of OGM-GE's Kinetics-Sounds lists; further `options` go to the data set's builder."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    check_split(split)
    if views is not None and name != "mfeat":
        raise ValueError(f"views applies to mfeat only, not to {name}")
    if name == "mfeat":
        path = MFEAT_PATH if root is None else os.path.join(root, "mfeat.npz")
        views = MFEAT_DEFAULT_VIEWS if views is None else views
        weak_signal, strong_signal = options.pop("weak_signal", 0.0), options.pop("strong_signal", 1.0)
        if weak_signal > 0:  # the sample-level benchmark (MfeatWeakViewDataset)
            if options.pop("degrade", 0.0) > 0:
                raise ValueError("degrade and weak_signal are two ways to degrade mfeat: give one")
            return MfeatWeakViewDataset(split, views=views, path=path, weak_signal=weak_signal,
                                        strong_signal=strong_signal, augment=augment, **options)
        if strong_signal != 1.0:
            raise ValueError("strong_signal weakens the strong views of the weak-view benchmark: give weak_signal too")
        return MfeatDataset(split, views=views, path=path, **options)
    if name == "synthetic":
        return SyntheticDataset(split, seed=seed, **options)
    if list_dir is not None and name != "ks":
        raise ValueError(f"list_dir applies to ks only, not to {name}")
    if split_file is not None and name != "mmdebiased":
        raise ValueError(f"split_file applies to mmdebiased only, not to {name}")
    if name == "ks":
        return build_kinetics_sounds(root, split, list_dir, augment=augment, skip_missing=skip_missing, **options)
    if name == "mmdebiased":
        return build_mmdebiased(root, split, split_file, augment=augment, skip_missing=skip_missing, **options)
    build = build_ucf101 if name == "ucf101" else build_cremad
    return build(root, split, augment=augment, skip_missing=skip_missing, **options)


def build_splits(name, **options):
    """The datasets of a run, as a dict: train (training transforms), train_eval (the same listing, read
    once, with evaluation transforms: for valuation and training accuracy), val and test. `options` as for
    build_dataset (augment excepted). For the weak-view mfeat set (weak_signal > 0) `augment` draws the weak view's
    noise anew per read; plain mfeat and synthetic have no random transforms and ignore it."""
    train = build_dataset(name, "train", augment=True, **options)
    train_eval = copy.copy(train)
    train_eval.augment = False
    return dict(train=train, train_eval=train_eval, val=build_dataset(name, "val", **options),
                test=build_dataset(name, "test", **options))


def main():
    parser = argparse.ArgumentParser(description="Data utilities.")
    parser.add_argument("--build-mfeat", metavar="CSV_DIR", required=True,
                        help="folder holding the UCI mfeat CSVs (mfeat-fou.csv ...); writes data/mfeat.npz")
    parser.add_argument("--out", default=MFEAT_PATH, help="where to write the .npz")
    args = parser.parse_args()
    build_mfeat_npz(args.build_mfeat, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

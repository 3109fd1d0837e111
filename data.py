"""
Datasets for multimodal training with sample-level modality valuation (Wei et al., CVPR 2024).

Every dataset returns `(inputs, label, index)` per item, `inputs` being a tuple with one tensor per
modality, and describes itself with `modalities`, `input_specs` (kind, channels) per modality,
`num_classes`, `class_names`, `sample_ids`, `labels` and `skipped`. `build_dataset` is the entry point.

- mfeat: UCI Multiple Features, six views of 2,000 handwritten digits, bundled as data/mfeat.npz
  (build it with `python data.py --build-mfeat CSV_DIR`). No download, runs on a CPU.
- synthetic: image-like modalities generated in memory, with knobs for dataset-level imbalance
  (`strength`) and sample-level imbalance (`sample_discrepancy`).
- ks, mmdebiased, ucf101: clips on disk in the layouts described in each reader's docstring.

`ResampledDataset` is the re-sampled training epoch D^rs of Algorithms 1 and 2: the original
samples plus uni-modal copies, each item carrying a mask of the modalities it keeps.
"""

import argparse
import json
import os
import re
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2

DATASETS = ("mfeat", "ks", "mmdebiased", "ucf101", "synthetic")
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Missing, malformed or inconsistent data; the message names the file or argument at fault."""


def check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


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
    The split is stratified 60/20/20 per class from a fixed seed; each view is standardised with the
    train split's mean and std (features with zero std are only centred).

    degrade > 0 builds sample-level imbalance at dataset-level balance (like MM-Debiased): in every sample one
    view, drawn uniformly, is blended with Gaussian noise, x <- (1 - s) x + s noise, at a per-sample strength
    s ~ U(0, degrade). The draw is fixed for the data set (its own seed, not the run's), so every split and run
    sees the same corruption; `degraded_view` and `degrade_strength` record it per sample."""

    def __init__(self, split, views=MFEAT_DEFAULT_VIEWS, path=MFEAT_PATH, degrade=0.0):
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
        parts = stratified_split(all_labels, MFEAT_FRACTIONS, MFEAT_SPLIT_SEED)
        train_rows, rows = parts[0], parts[SPLITS.index(split)]
        self.features = []  # one [N, D_view] tensor per view
        for x in all_features:
            mean, std = x[train_rows].mean(0), x[train_rows].std(0)
            std = torch.where(std > 1e-8, std, torch.ones_like(std))  # constant feature: centre only
            self.features.append((x[rows] - mean) / std)
        if not 0.0 <= degrade <= 1.0:
            raise ValueError(f"degrade must be in [0, 1], got {degrade}")
        generator = torch.Generator().manual_seed(MFEAT_SPLIT_SEED + 1)
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
        self.rows = rows  # row of each sample in the CSV files (0-based, header excluded)
        self.skipped = []

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return tuple(x[i] for x in self.features), self.labels[i].item(), i


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
        self.sample_ids = [f"synthetic-{split}-{i:05d}" for i in range(num_samples)]
        self.skipped = []

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return tuple(x[i] for x in self.inputs), self.labels[i].item(), i


# ----------------------------------------------------------------------------------------------
# Clips on disk: spectrograms (.npy) and frame folders (JPEG), shared by ks, mmdebiased and ucf101

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FLOW_MEAN, FLOW_STD = (0.5, 0.5), (0.226, 0.226)  # TSN's flow normalisation: centre 128, ImageNet's mean std
NUM_SEGMENTS = 3  # frames per clip, one per segment
VAL_FRACTION, VAL_SPLIT_SEED = 0.1, 2024  # validation carved from train where a data set has none


def frame_positions(count, augment):
    """0-based indices of the frames to read from a clip of `count` frames: one per segment of
    NUM_SEGMENTS near-equal segments [i*F//3, (i+1)*F//3) (F = 10: [0, 3), [3, 6), [6, 10)).
    Evaluation takes each segment's middle (F = 10: 1, 4, 7, i.e. frame_00002, _00005, _00008);
    training a random frame of each segment. With fewer than 3 frames, frames repeat."""
    positions = []
    for i in range(NUM_SEGMENTS):
        start = i * count // NUM_SEGMENTS
        stop = max((i + 1) * count // NUM_SEGMENTS, start + 1)
        positions.append(torch.randint(start, stop, ()).item() if augment else (start + stop - 1) // 2)
    return positions


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


def read_spectrogram(path):
    """float32 [1, H, W] from a 2-D .npy spectrogram, (1024, 128) or (257, 1004) in the KS layouts."""
    try:
        spectrogram = np.load(path)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path}: cannot read spectrogram ({error})") from None
    if spectrogram.ndim != 2:
        raise DataError(f"{path}: spectrogram must be 2-D (frequency x time), got shape {spectrogram.shape}")
    if not np.isfinite(spectrogram).all():
        raise DataError(f"{path}: spectrogram contains NaN or infinite values")
    return torch.from_numpy(spectrogram.astype(np.float32, copy=False)).unsqueeze(0)


def transform_frames(frames, augment, image_size, mean, std, flow=False):
    """uint8 frames [T, C, H, W] -> float [C, T, S, S], S = image_size; one crop and flip for all T.
    Train: RandomResizedCrop + horizontal flip; eval: Resize((S, S)); then normalised by mean / std.
    Cropping and resizing run on uint8, before the conversion to float."""
    if augment:
        frames = v2.RandomResizedCrop(image_size, antialias=True)(frames)
        if torch.rand(()) < 0.5:
            frames = frames.flip(-1)
            if flow:  # mirrored motion: horizontal flow changes sign (stored as 255 - u, zero at 127.5)
                frames[:, 0] = 255 - frames[:, 0]
    else:
        frames = v2.Resize((image_size, image_size), antialias=True)(frames)
    # one pass to float in [T, C, S, S] memory order (whatever order the frames came in), then normalised in
    # place: (x / 255 - mean) / std = (x - 255 mean) / (255 std)
    frames = frames.to(torch.float32, memory_format=torch.contiguous_format)
    scale = 255 * torch.tensor(std).view(-1, 1, 1)
    frames = frames.sub_(255 * torch.tensor(mean).view(-1, 1, 1)).div_(scale)
    return frames.permute(1, 0, 2, 3)


def stack_frames(frames):
    """RGB frames, uint8 [C, H, W] each as decode_jpeg returns them (a CHW view of HWC memory) -> [T, C, H, W]
    in channels-last memory. torch.stack of the CHW views would transpose every pixel into planar order; the
    channels-last stack is a plain copy, and the uint8 resize kernels run fastest on channels-last input."""
    return torch.stack([frame.permute(1, 2, 0) for frame in frames]).permute(0, 3, 1, 2)


def find_missing(spectrograms=(), frame_folders=()):
    """Why a clip cannot be read (the first missing file or empty folder), or None."""
    for path in spectrograms:
        if not os.path.isfile(path):
            return f"spectrogram {path} not found"
    for folder in frame_folders:
        if not os.path.isdir(folder):
            return f"frame folder {folder} not found"
        if not any(name.lower().endswith((".jpg", ".jpeg")) for name in os.listdir(folder)):
            return f"frame folder {folder} holds no .jpg frames"
    return None


def keep_readable(sample_ids, files, skip_missing, source):
    """Indices of the clips whose files are all there. files[i] = (spectrograms, frame_folders) of clip i.
    A missing file raises DataError, or with skip_missing is listed in the returned `skipped`."""
    kept, skipped = [], []
    for i, (sample_id, (spectrograms, frame_folders)) in enumerate(zip(sample_ids, files)):
        reason = find_missing(spectrograms, frame_folders)
        if reason is None:
            kept.append(i)
        elif skip_missing:
            skipped.append((sample_id, reason))
        else:
            raise DataError(f"clip {sample_id} listed in {source}: {reason} (skip such clips with skip_missing=True)")
    if not kept:
        raise DataError(f"{source}: no readable clips in this split" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return kept, skipped


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


class AudioVisualClips(Dataset):
    """Clips with a spectrogram and a frame folder each (ks, mmdebiased): modalities ("audio", "visual"),
    audio an "image" [1, H, W], visual a "video" [3, 3, S, S] (3 frames, ImageNet-normalised)."""

    def __init__(self, sample_ids, labels, spectrograms, frame_folders, class_names, source, augment=False,
                 image_size=224, skip_missing=False):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        kept, self.skipped = keep_readable(sample_ids, [((s,), (f,)) for s, f in zip(spectrograms, frame_folders)],
                                           skip_missing, source)
        self.sample_ids = [sample_ids[i] for i in kept]
        self.labels = torch.tensor([labels[i] for i in kept], dtype=torch.long)
        self.spectrograms = [spectrograms[i] for i in kept]
        self.frame_folders = [frame_folders[i] for i in kept]
        self.class_names, self.num_classes = list(class_names), len(class_names)
        self.modalities = ["audio", "visual"]
        self.input_specs = [("image", 1), ("video", 3)]
        self.augment, self.image_size = augment, image_size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        audio = read_spectrogram(self.spectrograms[i])
        folder = self.frame_folders[i]
        names = list_frames(folder)
        frames = stack_frames([read_jpeg(os.path.join(folder, names[p]), ImageReadMode.RGB)
                               for p in frame_positions(len(names), self.augment)])
        visual = transform_frames(frames, self.augment, self.image_size, IMAGENET_MEAN, IMAGENET_STD)
        return (audio, visual), self.labels[i].item(), i


def read_text_lines(path, what):
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} not found")
    with open(path) as f:
        return [(number, line.strip()) for number, line in enumerate(f, start=1) if line.strip()]


def check_root(name, root):
    if root is None:
        raise DataError(f"{name} needs root (the folder holding its clips)")
    if not os.path.isdir(root):
        raise DataError(f"{root}: {name} root folder not found")


# ----------------------------------------------------------------------------------------------
# Kinetics-Sounds

def read_ks_list(path, ogm_format):
    """[(clip name, label)] of one KS list. Authors' format: space-separated, the first field ends in
    the clip name, the last is the label. OGM-GE format: `id,10,label`."""
    entries = []
    for number, line in read_text_lines(path, "Kinetics-Sounds list"):
        fields = line.split(",") if ogm_format else line.split()
        name = os.path.basename(fields[0].rstrip("/"))
        try:
            label = int(fields[-1])
        except ValueError:
            label = None
        if len(fields) < (3 if ogm_format else 2) or label is None or not name:
            expected = "'id,10,label'" if ogm_format else "'<path ending in clip name> ... <integer label>'"
            raise DataError(f"{path}:{number}: expected {expected}, got {line!r}")
        entries.append((name, label))
    if not entries:
        raise DataError(f"{path}: Kinetics-Sounds list is empty")
    return entries


def build_kinetics_sounds(root, split, split_file=None, augment=False, image_size=224, skip_missing=False,
                          num_classes=None):
    """Kinetics-Sounds in the authors' layout:
        root/ks_audio/{train,val,test}_1fps_path.txt   lines '<.../clip name> ... <label>'
        root/ks_audio/<split>/<clip name>.npy          spectrogram, (1024, 128) or (257, 1004)
        root/ks_visual/<split>/<clip name>/frame_00001.jpg ...   1 frame per second
    With `split_file` = a folder of OGM-GE lists (`my_train.txt`, `my_val.txt`, `my_test.txt`, lines
    `id,10,label`), the lists come from there and the clips from the same root layout. OGM-GE ships no
    val list: without my_val.txt, val is carved from my_train.txt (VAL_FRACTION per class, fixed seed) and
    train is the rest. num_classes defaults to the largest label over all lists + 1 (31 for KS)."""
    check_root("ks", root)
    if split_file is None:
        lists = {s: os.path.join(root, "ks_audio", f"{s}_1fps_path.txt") for s in SPLITS}
        entries = {s: read_ks_list(path, ogm_format=False) for s, path in lists.items()
                   if s == split or os.path.isfile(path)}
        folder = {s: s for s in SPLITS}
    else:
        if not os.path.isdir(split_file):
            raise DataError(f"{split_file}: expected a folder of OGM-GE lists my_train.txt, my_val.txt, my_test.txt")
        lists = {s: os.path.join(split_file, f"my_{s}.txt") for s in SPLITS}
        carve = split in ("train", "val") and not os.path.isfile(lists["val"])
        needed = "train" if carve else split
        entries = {s: read_ks_list(path, ogm_format=True) for s, path in lists.items()
                   if s == needed or os.path.isfile(path)}
        folder = dict(train="train", val="train" if carve else "val", test="test")
        if carve:
            train_entries = entries.pop("train")
            is_val = carve_validation([y for _, y in train_entries], [n for n, _ in train_entries])
            entries["train"] = [e for e, v in zip(train_entries, is_val) if not v]
            entries["val"] = [e for e, v in zip(train_entries, is_val) if v]
            lists["val"] = f"{lists['train']} (validation part)"
            lists["train"] = f"{lists['train']} (training part)"
    all_labels = [y for split_entries in entries.values() for _, y in split_entries]
    if num_classes is None:
        num_classes = max(all_labels) + 1
    for s, split_entries in entries.items():
        for name, label in split_entries:
            if not 0 <= label < num_classes:
                raise DataError(f"{lists[s]}: clip {name} has label {label}, expected 0..{num_classes - 1}")
    names = [name for name, _ in entries[split]]
    return AudioVisualClips(
        names, [y for _, y in entries[split]],
        [os.path.join(root, "ks_audio", folder[split], f"{n}.npy") for n in names],
        [os.path.join(root, "ks_visual", folder[split], n) for n in names],
        [str(c) for c in range(num_classes)], lists[split], augment, image_size, skip_missing)


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
    Labels are indices into the sorted class names found in the JSON (or into `class_names`)."""
    check_root("mmdebiased", root)
    if split_file is None:
        raise DataError("mmdebiased needs split_file (the MM-Debiased JSON split file)")
    if not os.path.isfile(split_file):
        raise DataError(f"{split_file}: MM-Debiased JSON split file not found")
    try:
        with open(split_file) as f:
            table = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{split_file}: not valid JSON ({error})") from None
    if not isinstance(table, dict):
        raise DataError(f"{split_file}: expected a JSON object {{clip_id: {{\"subset\": ..., \"label\": ...}}}}")
    for clip_id, entry in table.items():
        if not isinstance(entry, dict) or entry.get("subset") not in MMDEBIASED_SUBSETS.values() \
                or not isinstance(entry.get("label"), str):
            raise DataError(f"{split_file}: clip {clip_id}: expected {{\"subset\": \"training\" | \"validation\" | "
                            f"\"testing\", \"label\": \"<class name>\"}}, got {entry!r}")
    names = sorted({entry["label"] for entry in table.values()}) if class_names is None else list(class_names)
    for clip_id, entry in table.items():
        if entry["label"] not in names:
            raise DataError(f"{split_file}: clip {clip_id} has unknown class name {entry['label']!r} "
                            f"(expected one of {', '.join(names)})")
    clip_ids = [c for c, entry in table.items() if entry["subset"] == MMDEBIASED_SUBSETS[split]]
    if not clip_ids:
        raise DataError(f"{split_file}: no clips with subset {MMDEBIASED_SUBSETS[split]!r}")
    return AudioVisualClips(
        clip_ids, [names.index(table[c]["label"]) for c in clip_ids],
        [os.path.join(root, "audio", f"{c}.npy") for c in clip_ids],
        [os.path.join(root, "visual", c) for c in clip_ids],
        names, f"{split_file} ({MMDEBIASED_SUBSETS[split]})", augment, image_size, skip_missing)


# ----------------------------------------------------------------------------------------------
# UCF-101: RGB frames and TV-L1 optical flow

class RGBFlowClips(Dataset):
    """UCF-101 clips: modalities ("rgb", "flow"), rgb a "video" [3, 3, S, S] (ImageNet-normalised),
    flow a "video" [2, 3, S, S]: the u and v grayscale JPEGs of the same frames stacked as 2 channels."""

    def __init__(self, sample_ids, labels, rgb_folders, u_folders, v_folders, class_names, source, augment=False,
                 image_size=224, skip_missing=False):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        files = [((), (r, u, v)) for r, u, v in zip(rgb_folders, u_folders, v_folders)]
        kept, self.skipped = keep_readable(sample_ids, files, skip_missing, source)
        self.sample_ids = [sample_ids[i] for i in kept]
        self.labels = torch.tensor([labels[i] for i in kept], dtype=torch.long)
        self.rgb_folders = [rgb_folders[i] for i in kept]
        self.u_folders = [u_folders[i] for i in kept]
        self.v_folders = [v_folders[i] for i in kept]
        self.class_names, self.num_classes = list(class_names), len(class_names)
        self.modalities = ["rgb", "flow"]
        self.input_specs = [("video", 3), ("video", 2)]
        self.augment, self.image_size = augment, image_size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        folder = self.rgb_folders[i]
        names = list_frames(folder)
        frames = stack_frames([read_jpeg(os.path.join(folder, names[p]), ImageReadMode.RGB)
                               for p in frame_positions(len(names), self.augment)])
        rgb = transform_frames(frames, self.augment, self.image_size, IMAGENET_MEAN, IMAGENET_STD)
        u_folder, v_folder = self.u_folders[i], self.v_folders[i]
        names = list_frames(u_folder)  # v/ holds the same file names
        flow = torch.stack([torch.cat([read_jpeg(os.path.join(u_folder, names[p]), ImageReadMode.GRAY),
                                       read_jpeg(os.path.join(v_folder, names[p]), ImageReadMode.GRAY)])
                            for p in frame_positions(len(names), self.augment)])  # [T, 2, H, W]
        flow = transform_frames(flow, self.augment, self.image_size, FLOW_MEAN, FLOW_STD, flow=True)
        return (rgb, flow), self.labels[i].item(), i


def build_ucf101(root, split, augment=False, image_size=224, skip_missing=False, split_id=1):
    """UCF-101 with the official split files and pre-extracted frames:
        root/splits/classInd.txt, trainlist0<split_id>.txt, testlist0<split_id>.txt
        root/rgb/<v_name>/frame_00001.jpg ...                 RGB frames
        root/flow/u/<v_name>/frame000001.jpg ..., root/flow/v/...   TV-L1 flow, grayscale JPEGs
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
    sample_ids, labels = [], []
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
        sample_ids.append(os.path.splitext(video)[0])
        labels.append(label)
    if not sample_ids:
        raise DataError(f"{list_path}: UCF-101 split file is empty")
    source = list_path
    if split != "test":
        groups = [re.sub(r"_c\d+$", "", v) for v in sample_ids]  # v_Class_gNN_cMM -> v_Class_gNN
        is_val = carve_validation(labels, groups)
        keep = [k for k, v in enumerate(is_val) if v == (split == "val")]
        sample_ids, labels = [sample_ids[k] for k in keep], [labels[k] for k in keep]
        source = f"{list_path} ({'validation' if split == 'val' else 'training'} part)"
    return RGBFlowClips(
        sample_ids, labels, [os.path.join(root, "rgb", v) for v in sample_ids],
        [os.path.join(root, "flow", "u", v) for v in sample_ids],
        [os.path.join(root, "flow", "v", v) for v in sample_ids],
        class_names, source, augment, image_size, skip_missing)


# ----------------------------------------------------------------------------------------------
# The re-sampled epoch D^rs (Algorithm 1 line 9, Algorithm 2 line 10)

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


# ----------------------------------------------------------------------------------------------
# Entry point

def build_dataset(name, split, *, root=None, split_file=None, views=None, augment=False, skip_missing=False,
                  seed=0, **options):
    """The `split` ("train", "val" or "test") of data set `name` (one of DATASETS).
    augment=True selects training transforms and random frame choice; False, evaluation transforms.
    `views` (mfeat only) picks and orders the views; further `options` go to the data set's class."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    check_split(split)
    if views is not None and name != "mfeat":
        raise ValueError(f"views applies to mfeat only, not to {name}")
    if name == "mfeat":
        path = MFEAT_PATH if root is None else os.path.join(root, "mfeat.npz")
        return MfeatDataset(split, views=MFEAT_DEFAULT_VIEWS if views is None else views, path=path, **options)
    if name == "synthetic":
        return SyntheticDataset(split, seed=seed, **options)
    if name == "ks":
        return build_kinetics_sounds(root, split, split_file, augment=augment, skip_missing=skip_missing, **options)
    if name == "mmdebiased":
        return build_mmdebiased(root, split, split_file, augment=augment, skip_missing=skip_missing, **options)
    if split_file is not None:
        raise ValueError("split_file does not apply to ucf101 (its split files are read from root/splits)")
    return build_ucf101(root, split, augment=augment, skip_missing=skip_missing, **options)


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

"""Benchmarks of the method's cost claims: what valuation, re-sampling and the data pipeline cost in this code.

The paper sells sample-level valuation as cheap next to heavier re-balancing methods (Sec. 4.3) and offers the
modality-level method for when valuing every sample every epoch costs too much (Sec. 3.4.2). Each target below is
a ratio of two things measured side by side in one run: `repeats` interleaved rounds (11 by default; each round
runs every side once, back to back), the ratio taken within each round, and the median of the rounds' ratios
compared with the target. The lowest and highest round ratio are printed beside it (and saved as "spread" with
--json), so that a reader sees how far the machine's noise moved it from one round to the next:

  1. valuation ~ one evaluation pass: engine.valuation_pass + Eq. 1-3 over a data set (Eq. 1-3 for every sample) / a plain
     evaluation pass (model(inputs) over the same loader, eval mode, no_grad), <= 1.10, for feature masking and
     for input masking of a late-fusion model (concat). Fusions that mix modalities inside the network
     (centralnet, mmtm) run the whole network per coalition: their ratio is informational, and the row checks
     that every forward call takes the whole batch ("batched"), never one sample at a time.
  2. modality-level is cheaper: the plan (method.ModalityLevel.plan) of the modality-level method (Alg. 2, valuing a subset Z of
     20 %) / that of the sample-level method (Alg. 1, valuing every sample), <= 0.25.
  3. a uni-modal copy costs about one encoder: a training step (engine.train_one_epoch on one batch: forward, loss,
     backward, SGD step) over uni-modal copies (each row keeps one modality, half of each, shuffled) / a step over
     full samples of the same batch size, <= 0.6. SGD with momentum, the paper's optimiser (Sec. 4.1).
  4. the loader beats the authors' pipeline: Kinetics-Sounds clips (10 JPEG frames of 340x256, three read, and a
     (1024, 128) float32 spectrogram, written to a temporary folder in the authors' layout) through a DataLoader,
     data.py's ks reader / a PIL + classic torchvision.transforms reader doing what the authors' reader does, in
     samples per second, >= 1.5, with train and with eval transforms (same workers, same batch size).
  5. the Shapley arithmetic is not the bottleneck: a per-sample Python loop of the authors' closed form
     phi_a = (v_a + v_ab - v_v) / 2 (timed on fewer samples and scaled) / shapley_mm.shapley_values on 10^6
     samples, n = 2, >= 100; and shapley_values with n = 6 in seconds per 10^6 samples, <= 1.
     Both sides start from the same value table, a tensor [N, 4]: the loop reads it into Python numbers with
     one tolist() (the fastest way a Python loop gets at a tensor's values) and counts that as its own. The
     ratio of the arithmetic alone (Python numbers already in lists) is reported too, as information.
  6. memory: peak memory of the valuation pass / that of the evaluation pass, <= 1.2, over one batch. Both are
     measured in one fresh subprocess (`python bench.py --memory-probe ...`) after the model and the data are
     loaded and after one warm-up pass of each (one-time buffers are then in place), side by side, `repeats`
     times. On the CPU the process's peak resident set size is reset to its current size before each pass
     (writing 5 to /proc/self/clear_refs, Linux), and the pass's peak is VmHWM after the pass minus VmRSS
     before it, both from /proc/self/status; the subprocess runs with MALLOC_MMAP_THRESHOLD_=65536, so that
     every tensor above 64 KiB gets pages of its own and gives them back when freed: the resident size then
     follows the memory in use, and what one pass frees does not hide the next pass's peak. On CUDA it is
     torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats, minus the memory allocated before.

Informational rows: the samples per second of a baseline training epoch and of a sample-level epoch (valuation of
every sample, Eq. 10 plan, then training over D^rs, whose copies count as samples); and how valuation scales with
processes: the wall time of engine.valuation_pass (the sample-level valuation pass, sharded and gathered) over the same
data set under `torchrun --nproc-per-node 2` / under `--nproc-per-node 1` (each launched once, `repeats` timed passes
after a warm-up one, medians). On a CPU machine the processes share its cores (Gloo), so this says how much the
sharding and gathering cost rather than what GPUs would gain.

  7. online valuation (train.py --valuation online) is nearly free: a training epoch over D^rs
     (engine.train_one_epoch over data.TrainingBatches, SGD) with online valuation (each step's features valued
     by the fusion head per coalition, method.OnlineValuation.record) / the same epoch without it, <= 1.03. Beside it,
     for information: the offline valuation pass of the sample level (the plan of method.SampleLevel: one pass over the
     training set in eval mode, Eq. 1-3, the Eq. 10 plan) / that training epoch; and a whole sample-level epoch,
     offline (that pass, then the training epoch) and online (the plan from the table the previous epoch filled,
     then the training epoch with online valuation), each / a baseline epoch over the same samples (no copies).
     Every side trains its own model from the same weights, every epoch over the same D^rs in the same batches
     (the plans the sides build each epoch are timed, not used), so that the sides differ only in how they
     value. That D^rs holds one uni-modal copy (of either modality, alternately) for a random COPY_FRACTION of
     the samples: a sample-level epoch of train.py --dataset synthetic after its warm-up adds 36 % more rows,
     whereas the Eq. 10 plan of the benchmark's untrained model would triple D.

Timing: on the CPU every measurement uses one intra-op thread, and, with --workers 0 (the default), the process's
CPU time (time.process_time), which other work on a shared machine does not inflate; with loader workers or on CUDA
it is wall time (after torch.cuda.synchronize). ResNet-18 encoders, synthetic data (data.SyntheticDataset: a
1-channel "spectrogram" and a 3-channel "image" modality) at a small resolution unless --full-resolution.

    python bench.py                          # CPU, about 3-5 minutes on two cores
    python bench.py --json results/bench.json   # also the rows as JSON, saved after each benchmark
    python bench.py --quick                  # tiny sizes, seconds: a smoke run, not a measurement
    python bench.py --only online            # the rows of one benchmark (names: BENCHES)
    python bench.py --device cuda --amp --full-resolution
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

import data
import engine
import method
import models
import reproduce
import shapley_mm
import train

# sizes of each setting (--quick, default, --full-resolution); --repeats, --batch-size and --size override theirs
SETTINGS = {
    "quick": dict(size=16, samples=32, batch_size=16, repeats=1, clips=4, loader_batch=2, epoch_samples=16,
                  online_samples=16, shapley_samples=20_000, loop_samples=2_000),
    "default": dict(size=64, samples=320, batch_size=64, repeats=11, clips=32, loader_batch=8, epoch_samples=32,
                    online_samples=128, shapley_samples=1_000_000, loop_samples=100_000),
    "full-resolution": dict(size=224, samples=1024, batch_size=64, repeats=11, clips=64, loader_batch=16,
                            epoch_samples=1024, online_samples=1024, shapley_samples=1_000_000, loop_samples=100_000),
}
NUM_CLASSES = 4
SUBSET_RATIO = 0.2  # Z of the modality-level method (Alg. 2)
KS_FRAMES, KS_FRAME_SIZE, KS_SPECTROGRAM = 10, (340, 256), (1024, 128)  # per clip: 10 frames (W, H), fbank
MIXING = tuple(models.MIXING_TAPS)  # the fusions that run the whole network per coalition
# the memory probe's environment: glibc malloc serves every block above 64 KiB with pages of its own and unmaps
# them when freed (no reuse of freed, still resident memory), so the resident set size follows the memory in use
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
COPY_FRACTION = 0.36  # target 7: uni-modal copies in D^rs, as a fraction of the samples
# the benchmarks, in the order they run; --only picks some
BENCHES = ("valuation", "modality-level", "copies", "loader", "shapley", "memory", "epochs", "online", "distributed")


# ----------------------------------------------------------------------------------------------
# timing


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, clock):
    """Seconds fn() takes on `clock` (time.process_time or time.perf_counter), the device synchronised."""
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


def side_by_side(fns, repeats, device, clock):
    """{name: [seconds] * repeats}: each fn once to warm up, then `repeats` rounds calling each fn in turn, so that
    every side sees the same machine load."""
    for fn in fns.values():
        fn()
    seconds = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds[name].append(timed(fn, device, clock))
    return seconds


def per_round_ratio(numerators, denominators, scale=1.0):
    """(median, lowest, highest) of scale * numerator / denominator over the interleaved rounds: the two sides of a
    round ran back to back under the same load, so a round's ratio cancels most of the machine's noise, and the
    median resists the rounds that another job disturbed. The lowest and highest are the spread reported."""
    ratios = sorted(scale * a / b for a, b in zip(numerators, denominators))
    return statistics.median(ratios), ratios[0], ratios[-1]


def median_ratio(seconds, numerator, denominator, scale=1.0):
    return per_round_ratio(seconds[numerator], seconds[denominator], scale)


def row(name, measured, target, met=None):
    """One result as --json writes it: `measured` is a value or (median, lowest, highest) of per-round ratios
    (spread: [lowest, highest], None for a single value); met is None for informational rows."""
    value, low, high = measured if isinstance(measured, tuple) else (measured, None, None)
    spread = None if low is None else [float(low), float(high)]
    return dict(name=name, value=float(value), spread=spread, target=target, met=met)


def at_most(name, measured, bound):
    result = row(name, measured, f"<= {bound:g}")
    result["met"] = result["value"] <= bound  # by the median
    return result


def at_least(name, measured, bound):
    result = row(name, measured, f">= {bound:g}")
    result["met"] = result["value"] >= bound
    return result


def informational(name, measured):
    return row(name, measured, "informational")


# ----------------------------------------------------------------------------------------------
# models and synthetic data


def synthetic_set(size, samples):
    return data.build_dataset("synthetic", "train", seed=0, size=size, num_classes=NUM_CLASSES,
                              train_size=samples)


def build_model(dataset, fusion, mask_mode, device):
    torch.manual_seed(0)  # the same weights for every model of one fusion
    return models.build_model(dataset.input_specs, dataset.num_classes, fusion, mask_mode).to(device)


def loader_settings(batch_size, device):
    """The loader settings of the passes and epochs: in this process, no workers."""
    return dict(batch_size=batch_size, num_workers=0, pin_memory=device.type == "cuda")


def offline_plan(mode, model, dataset, loader_kwargs, device, generator, amp):
    """The plan of one epoch of `mode` after the warm-up, offline (method.SampleLevel.plan): the valuation
    pass (Eq. 1-3) and the copies (Eq. 10 or 11)."""
    valuation = method.OfflineValuation(dataset, loader_kwargs, device, amp)
    settings = dict(subset_ratio=SUBSET_RATIO) if mode == "modality" else {}
    return method.METHODS[mode](valuation, generator, len(dataset), **settings).plan(0, model)


def train_epoch(model, method_, loader, optimizer, scaler, device, amp):
    """engine.train_one_epoch of `model` with `method_`'s loss (method.Method: plain cross-entropy)."""
    return engine.train_one_epoch(engine.TrainingStep(model, method_), loader, optimizer, scaler, device, 0, amp)


def evaluation_pass(model, dataset, loader_kwargs, device, amp):
    """The pass valuation is measured against: model(inputs) in the same loop (engine.evaluate), eval mode,
    no_grad."""
    return engine.evaluate(model, dataset, lambda model, inputs, target: dict(prediction=model(inputs).argmax(1)),
                           loader_kwargs, device, amp)


def valuate(model, dataset, loader_kwargs, device, amp):
    """phi [N, n] of every sample: train.py's valuation (one pass, then Eq. 1-3)."""
    correct = engine.valuation_pass(model, dataset, loader_kwargs, device, amp)["correct"]
    return shapley_mm.shapley_values(shapley_mm.benefit(correct))


def forward_batch_sizes(model, fn):
    """The rows of every call of model.forward while fn() runs (a forward pre-hook); [] when fn never calls it."""
    sizes = []
    handle = model.register_forward_pre_hook(lambda module, args: sizes.append(args[0][0].shape[0]))
    try:
        fn()
    finally:
        handle.remove()
    return sizes


def sgd(model):
    """The paper's optimiser (Sec. 4.1): SGD, momentum 0.9, lr 1e-3."""
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)


def copies_mask(batch, generator):
    """[B, 2] uni-modal copies: half the rows keep modality 0 alone, the others modality 1, shuffled."""
    keeps_first = (torch.arange(batch) < batch // 2)[torch.randperm(batch, generator=generator)]
    return torch.stack([keeps_first, ~keeps_first], dim=1)


# ----------------------------------------------------------------------------------------------
# targets 1-3, 6: valuation, modality level, uni-modal copies, memory


def bench_valuation(s, device, amp, clock):
    """Target 1: valuate / evaluation pass, per masking; mixing fusions: ratio and batched calls."""
    dataset = synthetic_set(s["size"], s["samples"])
    loader_kwargs = loader_settings(s["batch_size"], device)
    rows = []
    for mask_mode in ("feature", "input"):
        model = build_model(dataset, "concat", mask_mode, device)
        seconds = side_by_side({"eval": lambda: evaluation_pass(model, dataset, loader_kwargs, device, amp),
                                "valuate": lambda: valuate(model, dataset, loader_kwargs, device, amp)},
                               s["repeats"], device, clock)
        rows.append(at_most(f"valuation / eval pass, {mask_mode} masking (concat)",
                            median_ratio(seconds, "valuate", "eval"), 1.10))
    # the whole network per coalition: one batch is enough to see the ratio
    one_batch = Subset(dataset, range(s["batch_size"]))
    for fusion in MIXING:
        model = build_model(dataset, fusion, None, device)
        seconds = side_by_side({"eval": lambda: evaluation_pass(model, one_batch, loader_kwargs, device, amp),
                                "valuate": lambda: valuate(model, one_batch, loader_kwargs, device, amp)},
                               s["repeats"], device, clock)
        sizes = forward_batch_sizes(model, lambda: valuate(model, one_batch, loader_kwargs, device, amp))
        batched = len(sizes) > 0 and all(size == s["batch_size"] for size in sizes)
        rows.append(row(f"valuation / eval pass, input masking ({fusion})",
                        median_ratio(seconds, "valuate", "eval"), "batched", batched))
    return rows


def bench_modality_level(s, device, amp, clock):
    """Target 2: the plan, modality level (value Z only) / sample level (value every sample)."""
    dataset = synthetic_set(s["size"], s["samples"])
    model = build_model(dataset, "concat", "feature", device)
    loader_kwargs = loader_settings(s["batch_size"], device)
    generator = torch.Generator().manual_seed(0)
    seconds = side_by_side(
        {mode: lambda mode=mode: offline_plan(mode, model, dataset, loader_kwargs, device, generator, amp)
         for mode in ("sample", "modality")}, s["repeats"], device, clock)
    return [at_most(f"modality-level plan (Z = {SUBSET_RATIO:.0%}) / sample-level plan",
                    median_ratio(seconds, "modality", "sample"), 0.25)]


def bench_copies(s, device, amp, clock):
    """Target 3: a training step over uni-modal copies / one over full samples, same batch size."""
    dataset = synthetic_set(s["size"], s["batch_size"])
    model = build_model(dataset, "concat", "feature", device)
    optimizer = sgd(model)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    inputs, target, index = next(iter(DataLoader(dataset, **loader_settings(s["batch_size"], device))))
    full = torch.ones(len(target), 2, dtype=torch.bool)
    copies = copies_mask(len(target), torch.Generator().manual_seed(0))
    seconds = side_by_side(
        {name: lambda mask=mask: train_epoch(model, method.Method(), [(inputs, target, index, mask)], optimizer,
                                             scaler, device, amp)
         for name, mask in (("full", full), ("copies", copies))}, s["repeats"], device, clock)
    return [at_most("training step, uni-modal copies / full samples", median_ratio(seconds, "copies", "full"), 0.6)]


def peak_bytes(fn, device):
    """Peak memory fn() adds, in bytes (see the module docstring for the method)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak resident set size := current resident set size
    before = proc_status_kib("VmRSS")
    fn()
    return 1024 * (proc_status_kib("VmHWM") - before)


def proc_status_kib(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_probe(s, device, amp):
    """{mask mode: {"eval": [bytes], "valuate": [bytes]}}: the peak memory of each pass over one batch, after a
    warm-up pass of each (one-time buffers are then in place), `repeats` times, side by side. Run by bench_memory
    in a fresh process started with MALLOC_MMAP_THRESHOLD_, where what one pass frees is given back before the
    next one starts."""
    dataset = synthetic_set(s["size"], s["batch_size"])
    loader_kwargs = loader_settings(s["batch_size"], device)
    peaks = {}
    for mask_mode in ("feature", "input"):
        model = build_model(dataset, "concat", mask_mode, device)
        passes = {"eval": lambda: evaluation_pass(model, dataset, loader_kwargs, device, amp),
                  "valuate": lambda: valuate(model, dataset, loader_kwargs, device, amp)}
        for run in passes.values():
            run()
        peaks[mask_mode] = {name: [] for name in passes}
        for _ in range(s["repeats"]):
            for name, run in passes.items():
                peaks[mask_mode][name].append(peak_bytes(run, device))
    return peaks


def bench_memory(args, s):
    """Target 6: peak memory of the valuation pass / the evaluation pass, measured in a fresh subprocess."""
    here = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, os.path.join(here, "bench.py"), "--memory-probe", "--device", args.device,
               "--size", str(s["size"]), "--batch-size", str(s["batch_size"]), "--repeats", str(s["repeats"])]
    command += ["--amp"] if args.amp else []
    result = subprocess.run(command, env=dict(os.environ, **PROBE_ENV), cwd=here, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe {' '.join(command)} failed:\n{result.stderr}")
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    return [at_most(f"peak memory, valuation / eval pass, {mask_mode} masking (concat)",
                    per_round_ratio(peaks[mask_mode]["valuate"], [max(p, 1) for p in peaks[mask_mode]["eval"]]), 1.2)
            for mask_mode in ("feature", "input")]


# ----------------------------------------------------------------------------------------------
# target 4: the Kinetics-Sounds loader


def write_ks_fixture(root, clips, seed=0):
    """`clips` Kinetics-Sounds clips in the authors' layout under root (split "train"): 10 JPEG frames of 340x256
    (a smooth random layout plus noise, about 35 KB each, like real frames) and a (1024, 128) float32 .npy."""
    generator = torch.Generator().manual_seed(seed)
    os.makedirs(os.path.join(root, "ks_audio", "train"))
    lines = []
    width, height = KS_FRAME_SIZE
    for clip in range(clips):
        name = f"clip{clip:05d}"
        spectrogram = torch.randn(KS_SPECTROGRAM, generator=generator).numpy()
        np.save(os.path.join(root, "ks_audio", "train", f"{name}.npy"), spectrogram)
        folder = os.path.join(root, "ks_visual", "train", name)
        os.makedirs(folder)
        layout = F.interpolate(torch.rand(1, 3, 8, 10, generator=generator), size=(height, width), mode="bicubic",
                               align_corners=False)[0]  # [3, H, W]
        for frame in range(1, KS_FRAMES + 1):
            pixels = (layout + 0.05 * torch.randn(layout.shape, generator=generator)).clamp(0, 1)
            image = (pixels.permute(1, 2, 0) * 255).to(torch.uint8).numpy()  # [H, W, 3]
            Image.fromarray(image).save(os.path.join(folder, f"frame_{frame:05d}.jpg"), quality=90)
        lines.append(f"ks/train/{name} {clip % NUM_CLASSES}")
    with open(os.path.join(root, "ks_audio", "train_1fps_path.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


class AuthorsKSClips(Dataset):
    """The baseline: the authors' Kinetics-Sounds reader, rebuilt. Per clip, np.load of the spectrogram, then per
    frame PIL open + convert("RGB") and classic torchvision.transforms: RandomResizedCrop(224) +
    RandomHorizontalFlip (train) or Resize((224, 224)) (eval), then ToTensor + Normalize; the frames are stacked
    to [3, T, 224, 224]. The frame positions are data.py's, and the transforms are built once, not per item as
    in the authors' code (which only makes this baseline faster)."""

    def __init__(self, root, augment, image_size=224):
        with open(os.path.join(root, "ks_audio", "train_1fps_path.txt")) as f:
            entries = [line.split() for line in f if line.strip()]
        self.names = [os.path.basename(entry[0]) for entry in entries]
        self.labels = [int(entry[-1]) for entry in entries]
        self.root, self.augment = root, augment
        normalize = transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)
        if augment:
            self.transform = transforms.Compose([transforms.RandomResizedCrop(image_size),
                                                 transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
        else:
            self.transform = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(),
                                                 normalize])

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        name = self.names[i]
        spectrogram = torch.from_numpy(np.load(os.path.join(self.root, "ks_audio", "train", f"{name}.npy")))
        folder = os.path.join(self.root, "ks_visual", "train", name)
        files = sorted(os.listdir(folder))
        frames = [self.transform(Image.open(os.path.join(folder, files[p])).convert("RGB"))
                  for p in data.frame_positions(len(files), self.augment)]
        return (spectrogram.unsqueeze(0), torch.stack(frames, dim=1)), self.labels[i], i


def bench_loader(s, workers, clock):
    """Target 4: samples per second of data.py's ks reader / the authors'-style reader, same DataLoader
    settings, train and eval transforms. Workers persist, so the rates are of steady reading."""
    rows = []
    with tempfile.TemporaryDirectory() as root:
        write_ks_fixture(root, s["clips"])
        for augment, name in ((True, "train"), (False, "eval")):
            readers = {"data.py": data.build_dataset("ks", "train", root=root, augment=augment),
                       "authors": AuthorsKSClips(root, augment)}
            loaders = {reader: DataLoader(dataset, batch_size=s["loader_batch"], num_workers=workers,
                                          persistent_workers=workers > 0) for reader, dataset in readers.items()}
            seconds = side_by_side({reader: lambda loader=loader: sum(1 for _ in loader)
                                    for reader, loader in loaders.items()}, s["repeats"], torch.device("cpu"), clock)
            # samples per second: clips / median seconds; their ratio is the inverse ratio of the seconds
            rows.append(at_least(f"KS loader samples/s, data.py / PIL + transforms ({name} transforms)",
                                 median_ratio(seconds, "authors", "data.py"), 1.5))
    return rows


# ----------------------------------------------------------------------------------------------
# target 5: the Shapley arithmetic


def authors_loop(rows):
    """The authors' closed form for two modalities, one sample at a time: rows of (v_empty, v_a, v_v, v_ab)."""
    phi = []
    for _, v_a, v_v, v_ab in rows:
        phi.append(((v_a + v_ab - v_v) / 2, (v_v + v_ab - v_a) / 2))
    return phi


def bench_shapley(s, device, clock):
    """Target 5: a per-sample Python loop / shapley_values (n = 2), and shapley_values (n = 6) per 10^6 samples."""
    generator = torch.Generator().manual_seed(0)
    samples, loop_samples = s["shapley_samples"], s["loop_samples"]
    # Eq. 1 values of random coalition outcomes: [N, 2**n]
    values2 = shapley_mm.benefit(torch.rand(samples, 4, generator=generator) < 0.5).to(device)
    values6 = shapley_mm.benefit(torch.rand(samples, 64, generator=generator) < 0.5).to(device)
    loop_values = values2[:loop_samples].cpu()
    python_rows = loop_values.tolist()
    seconds = side_by_side({"vectorised": lambda: shapley_mm.shapley_values(values2),
                            "loop": lambda: authors_loop(loop_values.tolist()),
                            "loop arithmetic": lambda: authors_loop(python_rows),
                            "n = 6": lambda: shapley_mm.shapley_values(values6)}, s["repeats"], device, clock)
    scale = samples / loop_samples  # the loop ran on loop_samples rows
    return [
        at_least("shapley_values n = 2: per-sample loop time / shapley_values time",
                 median_ratio(seconds, "loop", "vectorised", scale), 100),
        informational("shapley_values n = 2: loop arithmetic only (Python numbers given) / shapley_values",
                      median_ratio(seconds, "loop arithmetic", "vectorised", scale)),
        at_most("shapley_values n = 6: seconds per 10^6 samples",
                statistics.median(seconds["n = 6"]) * 1_000_000 / samples, 1.0),
    ]


# ----------------------------------------------------------------------------------------------
# informational: training epochs


def bench_epochs(s, device, amp, clock):
    """Samples per second of a baseline training epoch and of a sample-level epoch (Alg. 1: valuation of every
    sample, the Eq. 10 plan, then training over D^rs = the samples + their uni-modal copies)."""
    dataset = synthetic_set(s["size"], s["epoch_samples"])
    model = build_model(dataset, "concat", "feature", device)
    optimizer = sgd(model)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    loader_kwargs = loader_settings(s["batch_size"], device)
    generator = torch.Generator().manual_seed(0)
    trained = {"baseline": [], "sample": []}  # rows trained on in each epoch, the warm-up epoch first

    def epoch(mode):
        copies = torch.zeros(len(dataset), 2, dtype=torch.long)
        if mode == "sample":
            copies = offline_plan("sample", model, dataset, loader_kwargs, device, generator, amp).copies
        epoch_set = data.ResampledDataset(dataset, *shapley_mm.expand_copies(copies))
        loader = DataLoader(epoch_set, shuffle=True, generator=generator, **loader_kwargs)
        trained[mode].append(train_epoch(model, method.Method(), loader, optimizer, scaler, device, amp)[1])

    seconds = side_by_side({mode: lambda mode=mode: epoch(mode) for mode in ("baseline", "sample")},
                           s["repeats"], device, clock)
    rates = {mode: statistics.median(rows / t for rows, t in zip(trained[mode][1:], seconds[mode]))
             for mode in trained}
    return [informational("baseline epoch, samples/s", rates["baseline"]),
            informational("sample-level epoch, samples/s (valuation included, copies count)", rates["sample"])]


# ----------------------------------------------------------------------------------------------
# target 7: online valuation


def bench_online(s, device, amp, clock):
    """Target 7: a training epoch over D^rs with online valuation / without; the offline valuation pass / that
    epoch; whole sample-level epochs, offline and online, / a baseline epoch (see the module docstring)."""
    dataset = synthetic_set(s["size"], s["online_samples"])
    loader_kwargs = loader_settings(s["batch_size"], device)
    sides = ("baseline", "offline", "online")
    trained = {side: build_model(dataset, "concat", "feature", device) for side in sides}  # same weights
    optimizers = {side: sgd(trained[side]) for side in sides}
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    generator = torch.Generator().manual_seed(0)
    copied = torch.randperm(len(dataset), generator=generator)[:round(COPY_FRACTION * len(dataset))]
    resampled = data.ResampledDataset(dataset, copied, torch.arange(len(copied)) % 2)  # D^rs of every epoch
    original = data.ResampledDataset(dataset, torch.zeros(0), torch.zeros(0))  # D, for the baseline
    parts = {"valuation pass": [], "training": [], "training, online valuation": []}  # seconds, warm-up first
    # the online side's method: each epoch's plan from the table its previous epoch's steps filled
    online = method.SampleLevel(method.OnlineValuation(len(dataset), len(dataset.modalities)), generator,
                                len(dataset), warmup=1)
    plain = method.Method()

    def training_epoch(side, epoch_set, method_):
        batches = data.TrainingBatches(epoch_set, s["batch_size"], torch.Generator().manual_seed(0))
        loader = DataLoader(epoch_set, batch_sampler=batches, num_workers=0, pin_memory=device.type == "cuda")
        train_epoch(trained[side], method_, loader, optimizers[side], scaler, device, amp)

    def offline_epoch():
        parts["valuation pass"].append(timed(lambda: offline_plan(
            "sample", trained["offline"], dataset, loader_kwargs, device, generator, amp), device, clock))
        parts["training"].append(timed(lambda: training_epoch("offline", resampled, plain), device, clock))

    def online_epoch():
        online.plan(1, trained["online"])  # this epoch's plan, from the previous epoch's table; a new table
        parts["training, online valuation"].append(
            timed(lambda: training_epoch("online", resampled, online), device, clock))

    seconds = side_by_side({"baseline": lambda: training_epoch("baseline", original, plain), "offline": offline_epoch,
                            "online": online_epoch}, s["repeats"], device, clock)
    seconds.update({part: times[1:] for part, times in parts.items()})  # the warm-up round left out
    return [at_most("training epoch on D^rs, online valuation on / off",
                    median_ratio(seconds, "training, online valuation", "training"), 1.03),
            informational("offline valuation pass (sample level) / training epoch on D^rs",
                          median_ratio(seconds, "valuation pass", "training")),
            informational("sample-level epoch, offline valuation / baseline epoch",
                          median_ratio(seconds, "offline", "baseline")),
            informational("sample-level epoch, online valuation / baseline epoch",
                          median_ratio(seconds, "online", "baseline"))]


# ----------------------------------------------------------------------------------------------


def distributed_probe(s, device, amp):
    """[seconds] of `repeats` sharded valuation passes (engine.valuation_pass) over one data set, in this process of a
    torchrun job, between barriers (none in a job of one process); after a warm-up pass."""
    device = engine.setup_distributed(-1 if device.type == "cpu" else None)
    dataset = synthetic_set(s["size"], s["samples"])
    model = build_model(dataset, "concat", "feature", device)
    loader_kwargs = loader_settings(s["batch_size"], device)
    together = torch.distributed.barrier if torch.distributed.is_initialized() else lambda: None  # one process: none
    seconds = []
    for k in range(s["repeats"] + 1):
        together()
        start = time.perf_counter()
        valuate(model, dataset, loader_kwargs, device, amp)
        synchronize(device)
        together()
        if k > 0:
            seconds.append(time.perf_counter() - start)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return seconds


def bench_distributed(args, s):
    """Informational: sharded valuation, wall time under 2 processes / under 1 (torchrun --standalone)."""
    here = os.path.dirname(os.path.abspath(__file__))
    seconds = {}
    for processes in (1, 2):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                   os.path.join(here, "bench.py"), "--distributed-probe", "--device", args.device,
                   "--size", str(s["size"]), "--batch-size", str(s["batch_size"]), "--repeats", str(s["repeats"])]
        command += ["--amp"] if args.amp else []
        result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=here, capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise RuntimeError(f"distributed probe {' '.join(command)} failed:\n{result.stderr}")
        seconds[processes] = json.loads(result.stdout.strip().splitlines()[-1])
    return [informational("valuation pass, 2 processes / 1 process, wall time (torchrun; CPU: shared cores)",
                          median_ratio(seconds, 2, 1))]


def spread_text(r):
    return "" if r["spread"] is None else f"[{r['spread'][0]:.3f}, {r['spread'][1]:.3f}]"


def format_table(rows):
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'name':<{width}}  {'median':>10}  {'rounds: low, high':>18}  {'target':<13}  met", "-" * (width + 54)]
    for r in rows:
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        lines.append(f"{r['name']:<{width}}  {r['value']:>10.3f}  {spread_text(r):>18}  {r['target']:<13}  {met}")
    return "\n".join(lines)


def get_args_parser():
    p = argparse.ArgumentParser(description="Cost benchmarks of sample-level modality valuation (see the docstring).")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as a JSON list, saved after each benchmark")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds, not a measurement")
    size.add_argument("--full-resolution", action="store_true", help="224-pixel inputs and larger sets (for a GPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    p.add_argument("--amp", action="store_true", help="mixed precision on CUDA (no-op on the CPU)")
    p.add_argument("--repeats", type=int, default=None, help="repetitions per measurement (median taken)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the loader benchmark")
    p.add_argument("--wall", action="store_true", help="wall time even on the CPU without workers")
    # internal: the peak-memory measurements of bench_memory, in this (fresh) process, printed as JSON
    p.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    # internal: the timed passes of bench_distributed, in one process of a torchrun job, printed as JSON by rank 0
    p.add_argument("--distributed-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=None, help="side of the synthetic inputs in pixels")
    p.add_argument("--only", type=reproduce.comma_list(BENCHES), default=list(BENCHES), metavar="NAMES",
                   help=f"run only these benchmarks, comma-separated, from {','.join(BENCHES)} (default: all)")
    return p


def fail(message):
    """One line on stderr and exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_json_path(path):
    """Refuse, before any measurement, a --json FILE that cannot be written."""
    if os.path.isdir(path):
        fail(f"--json {path} is a folder; give a file name")
    try:
        train.check_writable(os.path.dirname(os.path.abspath(path)), "--json")
    except train.TrainingError as error:
        fail(error)


def save_rows(path, rows):
    """--json FILE, the rows measured so far, written atomically (train.write_atomic) after each benchmark."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        train.write_atomic(path, lambda f: f.write((json.dumps(rows, indent=2) + "\n").encode()))
    except OSError as error:
        fail(f"--json {path}: cannot write it ({error.strerror or error}); the previous file is kept")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: CUDA is not available")
    s = dict(SETTINGS["quick" if args.quick else "full-resolution" if args.full_resolution else "default"])
    for key in ("repeats", "batch_size", "size"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if s["repeats"] < 1 or s["batch_size"] < 2 or s["size"] < 16 or args.workers < 0:
        fail(f"need --repeats >= 1, --batch-size >= 2, --size >= 16 and --workers >= 0, got {s['repeats']}, "
             f"{s['batch_size']}, {s['size']} and {args.workers}")
    if args.memory_probe:
        print(json.dumps(memory_probe(s, device, args.amp)))
        return None
    if args.distributed_probe:
        seconds = distributed_probe(s, device, args.amp)
        if int(os.environ["RANK"]) == 0:
            print(json.dumps(seconds))
        return None
    if args.json:
        check_json_path(args.json)
    on_cpu_clock = device.type == "cpu" and args.workers == 0 and not args.wall
    clock = time.process_time if on_cpu_clock else time.perf_counter
    print(f"device {device}{' (amp)' if args.amp else ''}, {'CPU' if on_cpu_clock else 'wall'} time, "
          f"{torch.get_num_threads()} thread, synthetic {s['size']}x{s['size']}, batch {s['batch_size']}, "
          f"{s['repeats']} repeats, loader workers {args.workers}", flush=True)
    start = time.perf_counter()
    rows = []
    benches = {"valuation": lambda: bench_valuation(s, device, args.amp, clock),
               "modality-level": lambda: bench_modality_level(s, device, args.amp, clock),
               "copies": lambda: bench_copies(s, device, args.amp, clock),
               "loader": lambda: bench_loader(s, args.workers, clock),
               "shapley": lambda: bench_shapley(s, device, clock),
               "memory": lambda: bench_memory(args, s),
               "epochs": lambda: bench_epochs(s, device, args.amp, clock),
               "online": lambda: bench_online(s, device, args.amp, clock),
               "distributed": lambda: bench_distributed(args, s)}
    for name in BENCHES:
        if name not in args.only:
            continue
        bench_start = time.perf_counter()
        new_rows = benches[name]()
        rows.extend(new_rows)
        for r in new_rows:
            print(f"  {r['name']}: {r['value']:.3f} {spread_text(r)} ({r['target']})", flush=True)
        print(f"  ({time.perf_counter() - bench_start:.0f} s)", flush=True)
        if args.json:
            save_rows(args.json, rows)
    print()
    print(format_table(rows))
    missed = [r["name"] for r in rows if r["met"] is False]
    print("\nall targets met" if not missed else "\nNOT MET: " + "; ".join(missed))
    print(f"({time.perf_counter() - start:.0f} s)")
    return rows


if __name__ == "__main__":
    main()

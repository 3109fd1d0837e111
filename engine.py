"""The loops every mode shares: one training epoch over D^rs, one evaluation pass, and the plumbing of several
processes. train.py holds the command line and the epoch loop; method.py and comparators.py say what a mode changes.

    train_one_epoch   Alg. 1 line 12 (Alg. 2 line 14): each step calls the method's loss and its gradient hook
                      (TrainingStep), with no branch on mode, valuation or method
    evaluate          one read of a data set in eval mode: one device move per batch, AMP, sharded over the
                      processes of a torchrun job and gathered in the data set's order. Valuation, validation, test,
                      --eval-only, the compared methods' passes and reproduce.py's features all read through it.
    valuation_pass    evaluate with the coalition correctness (Sec. 3.2): evaluation and valuation in one read

Several processes (torchrun) follow torchvision's references/classification/utils.py: the process group from env://
(setup_distributed), rank 0 alone prints and writes (is_main_process), and a single process is a world of one,
so the CPU, one GPU and torchrun run one code path.
"""
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import shapley_mm

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class TrainingError(Exception):
    """A failure worth one line on stderr rather than a traceback; `code` is the exit status."""

    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------
# several processes (torchrun): one code path, a single process being a world of one


def launched_by_torchrun():
    """True in a process of a torchrun job of several processes (WORLD_SIZE > 1); a job of one is a single process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_torchrun_environment():
    """What torchrun sets, checked in one line each: WORLD_SIZE and RANK whole numbers, a RANK > 0 only in a job of
    several processes (a variable left over in the shell would silence this process and write no run folder), and
    WORLD_SIZE > 1 only with the rest of what torchrun sets."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "0")
        if not value.isdigit():
            raise TrainingError(f"{name}={value} is not a whole number; torchrun sets it, so unset it for one "
                                f"process or launch with torchrun --nproc-per-node N train.py ...")
    if int(os.environ.get("RANK", "0")) > 0 and not launched_by_torchrun():
        raise TrainingError(f"RANK={os.environ['RANK']} is set without WORLD_SIZE > 1 (a variable left over from "
                            f"another job?): unset RANK for one process, or launch with torchrun")
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if launched_by_torchrun() and missing:
        raise TrainingError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for several processes, but {', '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not set: launch with torchrun --nproc-per-node N "
                            f"train.py ..., or unset WORLD_SIZE for one process")


def select_device(gpu):
    if gpu is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if gpu < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available() or gpu >= torch.cuda.device_count():
        raise TrainingError(f"--gpu {gpu}: no such CUDA device (found {torch.cuda.device_count()}); use --gpu -1 for CPU")
    return torch.device(f"cuda:{gpu}")


def setup_distributed(gpu):
    """The device of this process; under torchrun (WORLD_SIZE > 1) also the default process group, from env://:
    NCCL with one GPU per process (LOCAL_RANK's), Gloo on CPUs (--gpu -1 or no GPU), as torchvision's references."""
    if not launched_by_torchrun():
        return select_device(gpu)
    check_torchrun_environment()
    if gpu is not None and gpu >= 0 and not torch.cuda.is_available():
        raise TrainingError(f"--gpu {gpu}: no CUDA device here; use --gpu -1 for the CPU")
    use_cuda = torch.cuda.is_available() and gpu != -1
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    return device


def is_main_process():
    """True in a single process and in rank 0: the one process that prints and writes files (before the process
    group exists, torchrun's RANK says which)."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0


def warn(message):
    """A warning on stderr, from the main process only."""
    if is_main_process():
        print(f"warning: {message}", file=sys.stderr)


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


def broadcast_tensor(tensor):
    """rank 0's `tensor` on every process, in place (as is in a single process): a random draw all must share."""
    if dist.is_initialized():
        dist.broadcast(tensor, src=0)
    return tensor


def sum_over_processes(tensor, op=None):
    """The sum (or `op`, a dist.ReduceOp) of `tensor` over every process, as a new tensor on its device (a copy in a
    single process): a statistic of the global batch or of the whole epoch, the same on every process."""
    total = tensor.clone()
    if dist.is_initialized():
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        reduced = total.to(device)
        dist.all_reduce(reduced, op=op or dist.ReduceOp.SUM)
        total = reduced.to(tensor.device)
    return total


def mean_over_processes(tensor):
    """The mean of `tensor` over the processes (a copy in a single process): a per-batch statistic of the global
    batch, each process's batch counting alike."""
    return sum_over_processes(tensor) / world()[1]


def unwrap(module):
    """The module a DistributedDataParallel wraps (torchvision's model_without_ddp); the module itself otherwise."""
    return module.module if isinstance(module, DistributedDataParallel) else module


# ----------------------------------------------------------------------------------------------
# the training step and epoch (Alg. 1 line 12, Alg. 2 line 14)


def autocast(device, amp):
    """Mixed precision on CUDA when --amp is given; full precision otherwise."""
    return torch.autocast(device.type, enabled=amp and device.type == "cuda")


def to_device(inputs, device):
    return [x.to(device, non_blocking=True) for x in inputs]


class TrainingStep(torch.nn.Module):
    """The model and a method's loss as one module (DeiT's DistillationLoss pattern turned into the module
    DistributedDataParallel wraps): every forward a method makes, the model's own or its parts' (encode, fuse, the
    coalitions), runs inside one DDP forward, so the gradients are all-reduced as backward computes them, and the
    method's gradient hook (modulate) runs after that, on the same gradients in every process."""

    def __init__(self, model, method):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, inputs, target, mask, index):
        return self.method.loss(self.model, inputs, target, mask, index)

    def modulate(self):
        self.method.modulate(self.model)


def progress(step, total, start, stream=sys.stderr):
    """A progress line for long epochs, from the main process: rewritten in place on a terminal; in a log file, at
    most one line per quarter of the epoch."""
    if total < 50 or not is_main_process():
        return
    if stream.isatty():
        stream.write(f"\r  step {step}/{total}  {(time.time() - start) / step:.2f}s/step ")
        if step == total:
            stream.write("\n")
        stream.flush()
    elif step % max(1, total // 4) == 0 and step < total:
        print(f"  step {step}/{total}  {time.time() - start:.0f}s", file=stream, flush=True)


def train_one_epoch(step, loader, optimizer, scaler, device, epoch, amp=False):
    """One pass over D^rs (Alg. 1 line 12). Each batch mixes full samples and uni-modal copies in shuffled order, as
    the paper trains; `mask` [B, n] says which modalities each row keeps. `step` is a TrainingStep (or its
    DistributedDataParallel): the method's loss, then, after backward, its gradient hook. Returns (mean loss, rows
    trained), over every process."""
    step.train()
    total_loss, total_samples, start = 0.0, 0, time.time()
    for k, (inputs, target, index, mask) in enumerate(loader, start=1):
        target, mask = target.to(device), mask.to(device)
        with autocast(device, amp):
            loss = step(to_device(inputs, device), target, mask, index)
        if not torch.isfinite(loss):  # under torchrun, the process that sees it stops, and torchrun ends the others
            kept = (f"last.pt holds epoch {epoch - 1}, the last good one" if epoch > 0
                    else "no checkpoint was written")
            raise TrainingError(f"non-finite loss ({loss.item()}) at epoch {epoch}, step {k}: stopped; {kept}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        unwrap(step).modulate()
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss.item() * len(target)
        total_samples += len(target)
        progress(k, len(loader), start)
    totals = sum_over_processes(torch.tensor([total_loss, total_samples], dtype=torch.float64))
    return totals[0].item() / max(int(totals[1].item()), 1), int(totals[1].item())


# ----------------------------------------------------------------------------------------------
# one evaluation pass over a data set


@torch.no_grad()
def evaluate(model, dataset, read_batch, loader_kwargs, device, amp=False):
    """`read_batch(model, inputs, target)` over every sample of `dataset`, in eval mode, once: a dict of per-row
    tensors [B, ...] per batch. Returns the same keys [N, ...] on the CPU in the data set's order, with `index` [N]
    and `labels` [N], on every process. Under torchrun each process reads its shard (DistributedSampler in order:
    process r takes items r, r + W, ...) and the shards are gathered, without the items the sampler repeats to even
    them out. The loader should use evaluation transforms."""
    model.eval()
    rank, world_size = world()
    shard = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False) if world_size > 1 else None
    # a DataLoader draws its workers' base seed when iterated, from torch's global generator if it has none of its
    # own: a pass must not move the generator that training draws from (reads, OGM-GE's noise), or valuing only for
    # the log (--track-phi) would change the training that follows
    loader = DataLoader(dataset, sampler=shard, shuffle=False, generator=torch.Generator(), **loader_kwargs)
    parts = {}
    for inputs, target, index in loader:
        inputs, target = to_device(inputs, device), target.to(device)  # the one device move
        with autocast(device, amp):
            rows = read_batch(model, inputs, target)
        for key, value in dict(rows, index=index, labels=target).items():
            parts.setdefault(key, []).append(value.cpu())
    result = {key: torch.cat(values) for key, values in parts.items()}
    if world_size == 1:
        return result
    shards = [None] * world_size
    dist.all_gather_object(shards, result)
    return {key: torch.stack([s[key] for s in shards], 1).flatten(0, 1)[:len(dataset)] for key in result}


def coalition_reader():
    """A read_batch for evaluate: which of the 2**n coalitions of modalities predict each row correctly
    (shapley_mm.coalition_correctness, correct [B, 2**n] bool) and the softmax of the all-modality logits (scores
    [B, K]). For late fusion the encoders run once per batch and only the fusion head runs per coalition; fusions
    that mix modalities inside the network run once per coalition (models coalition_predictor). Absent modalities'
    features are computed once per pass."""
    absent_cache = {}

    def read_batch(model, inputs, target):
        predict = model.coalition_predictor(inputs, absent_cache)
        correct, full_logits = shapley_mm.coalition_correctness(predict, target, model.num_modalities)
        return dict(correct=correct, scores=full_logits.float().softmax(1))
    return read_batch


def valuation_pass(model, dataset, loader_kwargs, device, amp=False, also=None):
    """Evaluation and valuation (Sec. 3.2) of every sample of `dataset` in one read: dict(index [N], labels [N],
    prediction [N] from all modalities, scores [N, K], correct [N, 2**n] bool), in the data set's order; with
    `also`, another read_batch whose fields are read in the same pass."""
    valuation = coalition_reader()

    def read_batch(model, inputs, target):
        return dict(valuation(model, inputs, target), **(also(model, inputs, target) if also else {}))

    result = evaluate(model, dataset, read_batch, loader_kwargs, device, amp)
    result["prediction"] = result["scores"].argmax(1)
    return result


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

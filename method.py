"""The paper's method as one object, in the order of Algorithms 1 and 2, and the small base every mode shares.

A `Method` is what a training mode changes in the loop that train.py runs. Each epoch the loop asks it for the
epoch's plan, builds D^rs from the plan's copies, trains on it and validates:

    plan(epoch, model)                       -> Plan: the phase, the valuation it made, the uni-modal copies
    loss(model, inputs, target, mask, index) the training loss of one step (engine.TrainingStep calls it)
    modulate(model)                          after backward (and DDP's all-reduce), before the optimiser step
    end_epoch(epoch)                         measurements after the epoch's training
    state_dict() / load_state_dict()         running state, kept in checkpoints so a resumed run is exact
    summary()                                what the epoch's log record shows of the method

The defaults are plain joint training. `ModalityValuation` is the paper's method (baseline, warm-up, sample,
modality, naive, reversed; valuation offline or online); comparators.py holds the methods it is compared with.

Algorithm 1 (sample level) and 2 (modality level), line by line, in ModalityValuation.plan and .loss:
    line 2      phase: plain joint training for the first --warmup epochs
    lines 4-5   choose_valued: every training sample (Alg. 1), or a random subset Z (Alg. 2)
    line 6      value them (Eq. 1-3): offline, one evaluation pass (engine.valuation_pass, shapley_mm); online,
                from what the previous epoch's training steps recorded (value_online)
    lines 7-9   plan_copies: Eq. 10's copies of each sample's low-contributing modalities (Alg. 1), Eq. 11's
                modality and probability (Alg. 2), or Table 4's ablations; D^rs = D + copies
                (shapley_mm.expand_copies, data.ResampledDataset, built by train.py)
    line 11     loss: the cross-entropy of each row with the modalities its mask keeps (engine.train_one_epoch)
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Subset

import engine
import shapley_mm

RESAMPLING_MODES = ("sample", "modality", "naive", "reversed")  # the modes that value and re-sample (Alg. 1-2)


@dataclass
class Plan:
    """One epoch's plan: its phase (the log's "phase"), the samples valued (valued [V], None if none), their
    contributions (phi [V, n]) and the uni-modal copies of D^rs (copies [N, n]; copies[k, i] extra copies of
    sample k keep modality i alone; None for none)."""
    phase: str
    valued: torch.Tensor = None
    phi: torch.Tensor = None
    copies: torch.Tensor = None


class OfflineValuation:
    """Alg. 1 line 6 as the paper takes it: the samples of the training set valued now, in eval mode, with evaluation
    transforms (train_eval), in one pass (engine.valuation_pass, then Eq. 1-3). Called with the model and the
    indices to value [V]; returns phi [V, n]."""

    def __init__(self, train_eval, loader_kwargs, device, amp=False):
        self.train_eval, self.loader_kwargs, self.device, self.amp = train_eval, loader_kwargs, device, amp

    def __call__(self, model, valued):
        result = engine.valuation_pass(model, Subset(self.train_eval, valued.tolist()), self.loader_kwargs,
                                       self.device, self.amp)
        return engine.contributions(result)


class Method:
    """Plain joint training, and the defaults of every method. A method acts in its epochs from `warmup` to
    `last_epoch` (None: to the end); before, the phase is "warmup", after, "joint". With `valuation` (an
    OfflineValuation; --track-phi), every epoch values the whole training set for the log, and plans nothing."""
    name = "baseline"
    some_parameters_idle = False  # whether a step may leave some parameters without a gradient (DDP must know)

    def __init__(self, warmup=0, last_epoch=None, valuation=None):
        self.warmup, self.last_epoch, self.valuation = warmup, last_epoch, valuation
        self.active = False

    def phase(self, epoch):
        if epoch < self.warmup:
            return "warmup"
        if self.last_epoch is not None and epoch > self.last_epoch:
            return "joint"
        return self.name

    def plan(self, epoch, model):
        plan = Plan(self.phase(epoch))
        if self.valuation is not None:
            plan.valued = torch.arange(len(self.valuation.train_eval))
            plan.phi = self.valuation(model, plan.valued)
        self.start_epoch(epoch, active=plan.phase == self.name)
        return plan

    def start_epoch(self, epoch, active):
        self.active = active

    def loss(self, model, inputs, target, mask=None, index=None):
        return F.cross_entropy(model(inputs, mask).float(), target)

    def modulate(self, model):
        pass

    def end_epoch(self, epoch):
        pass

    def summary(self):
        return None

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


# ----------------------------------------------------------------------------------------------
# Algorithms 1 and 2: which samples to value, and the copies their contributions ask for


def choose_valued(phase, num_samples, subset_ratio, generator):
    """The training samples to value (Alg. 1 / 2, line 5): a random subset Z of subset_ratio of them for the
    modality level (phase "modality"), every sample otherwise."""
    if phase != "modality":
        return torch.arange(num_samples)
    subset_size = max(1, int(round(subset_ratio * num_samples)))
    return torch.randperm(num_samples, generator=generator)[:subset_size].sort().values


def plan_copies(phase, phi, valued, num_samples, generator, alpha=1.0, f_m="linear"):
    """The uni-modal copies of this epoch (Alg. 1 lines 7-9, Alg. 2 lines 7-10), copies [N, n]: copies[k, i] extra
    copies of training sample k keep modality i alone. phi [V, n] are the contributions of the samples `valued` [V]."""
    n = phi.shape[1]
    if phase == "modality":  # Eq. 11: re-sample the overall low-contributing modality with probability p
        modality, probability = shapley_mm.modality_level_plan(phi, alpha=alpha, f_m=f_m)
        return shapley_mm.modality_level_copies(num_samples, n, modality, probability, generator=generator)
    copies = torch.zeros(num_samples, n, dtype=torch.long)
    copies[valued] = shapley_mm.sample_level_copies(phi)  # Eq. 10
    if phase == "naive":  # Table 4: same totals per modality, on random samples
        return shapley_mm.naive_copies(copies, generator=generator)
    if phase == "reversed":  # Table 4: the copies go to each sample's highest-contributing modality
        full_phi = torch.zeros(num_samples, n)
        full_phi[valued] = phi
        return shapley_mm.reversed_copies(full_phi, copies, generator=generator)
    return copies


# ----------------------------------------------------------------------------------------------
# online valuation (--valuation online): line 6 taken inside line 11


def online_table(num_samples, n):
    """What online valuation records over one epoch: correct [N, 2**n] bool, which coalitions predicted each
    training sample correctly at the step that held it, and seen [N] bool."""
    return dict(correct=torch.zeros(num_samples, 2 ** n, dtype=torch.bool),
                seen=torch.zeros(num_samples, dtype=torch.bool))


@torch.no_grad()
def value_online(model, features, target, index, mask, table):
    """Online valuation of one training batch (Sec. 3.2, Eq. 1 taken during training): for the original rows (every
    modality kept; a uni-modal copy's sample is valued by its original row), the 2**n - 1 coalition predictions
    from the pooled features the step computed, outside its graph, the fusion head run per coalition with the absent
    features zeroed (feature masking), written into `table` at the rows' sample indices. features: one [B, d_i]
    per modality; target [B], mask [B, n] on the device; index [B]."""
    original = mask.all(1)  # [B]
    if not original.any():
        return
    features = [feature[original] for feature in features]  # [B_o, d_i], no graph under no_grad
    correct, _ = shapley_mm.coalition_correctness(lambda keep: model.fuse(features, keep), target[original],
                                                  model.num_modalities)
    rows = index.cpu()[original.cpu()]
    table["correct"][rows] = correct.cpu()
    table["seen"][rows] = True


def gathered_table(table):
    """The online table of every process's steps (each process values the rows of its own batches): a sample is
    seen if any process saw it, and its row is the one that process wrote (processes that share a padded batch
    write the same row)."""
    if not dist.is_initialized():
        return table
    return {key: engine.sum_over_processes(value.to(torch.uint8), dist.ReduceOp.MAX).bool()
            for key, value in table.items()}


# ----------------------------------------------------------------------------------------------
# the paper's method


class ModalityValuation(Method):
    """Sample-level modality valuation (Wei et al., CVPR 2024): each epoch after the warm-up, value the training
    samples' modalities (Eq. 1-3) and re-train the low-contributing ones on their own, per sample (mode "sample",
    Alg. 1, Eq. 10) or per modality (mode "modality", Alg. 2, Eq. 11), or as Table 4's ablations ("naive",
    "reversed"); mode "baseline" is joint training throughout. With `online`, line 6 is taken inside line 11: the
    training steps of epoch t record each sample's coalition predictions (value_online) and epoch t + 1 is planned
    from them. `track_phi` values every epoch, the warm-up and the baseline too, for the log."""

    def __init__(self, mode, num_samples, num_modalities, generator, valuation, warmup=0, online=False,
                 track_phi=False, subset_ratio=0.2, alpha=1.0, f_m="linear"):
        super().__init__(warmup=warmup, valuation=valuation)
        self.name, self.num_samples, self.num_modalities, self.generator = mode, num_samples, num_modalities, generator
        self.online, self.track_phi = online, track_phi
        self.subset_ratio, self.alpha, self.f_m = subset_ratio, alpha, f_m
        self.table = None  # online: what the current epoch's steps record (online_table)

    def phase(self, epoch):
        return "baseline" if self.name == "baseline" else super().phase(epoch)  # line 2

    def plan(self, epoch, model):
        plan = Plan(self.phase(epoch))  # line 2: the warm-up, or the method
        resampling = plan.phase in RESAMPLING_MODES
        if resampling or self.track_phi:  # lines 4-6
            plan.valued, plan.phi = self.value(model, plan.phase)
        if resampling and plan.phi is not None:  # lines 7-9
            plan.copies = plan_copies(plan.phase, plan.phi, plan.valued, self.num_samples, self.generator,
                                      self.alpha, self.f_m)
        # online: this epoch's steps record what the next epoch's plan will need
        next_needs = self.track_phi or (self.name != "baseline" and epoch + 1 >= self.warmup)
        self.table = online_table(self.num_samples, self.num_modalities) if self.online and next_needs else None
        return plan

    def value(self, model, phase):
        """Lines 5-6: (valued [V], phi [V, n]). Offline, every sample or Z valued now, in eval mode; online, every
        sample the previous epoch's steps saw, from their table (None, None before any epoch filled one)."""
        if not self.online:
            valued = choose_valued(phase, self.num_samples, self.subset_ratio, self.generator)
            return valued, self.valuation(model, valued)
        if self.table is None:
            return None, None
        table = gathered_table(self.table)
        valued = table["seen"].nonzero().squeeze(1)  # Z is every sample seen
        return valued, engine.contributions(dict(correct=table["correct"][valued]))

    def loss(self, model, inputs, target, mask=None, index=None):  # line 11
        if self.table is None:
            return super().loss(model, inputs, target, mask)
        features = model.encode(inputs, mask)  # encode, then fuse: valuation reuses the step's features
        loss = F.cross_entropy(model.fuse(features).float(), target)
        value_online(model, features, target, index, mask, self.table)
        return loss

    def state_dict(self):
        return dict(online=self.table)

    def load_state_dict(self, state):
        self.table = state["online"]

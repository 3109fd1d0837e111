"""The paper's method in the order of Algorithms 1 and 2, the `Method` every training mode is, and the registry of
modes that train.py reads.

A `Method` is what a training mode changes in the loop that train.py runs. Each epoch the loop asks it for the
epoch's plan, builds D^rs from the plan's copies, trains on it and validates:

    plan(epoch, model)                       -> Plan: the phase, the valuation it made, the uni-modal copies
    start_epoch(epoch, active, model)        the method's own epoch-level state (the base's plan calls it)
    loss(model, inputs, target, mask, index) the training loss of one step (engine.TrainingStep calls it)
    modulate(model)                          after backward (and DDP's all-reduce), before the optimiser step
    end_epoch(epoch, model)                  measurements after the epoch's training
    state_dict() / load_state_dict()         running state, kept in checkpoints so a resumed run is exact
    summary()                                what the epoch's log record shows of the method

and, as a class, what train.py needs before there is a model:

    name, about                  its --mode and the line --help shows
    fusion                       the one fusion it needs (None: any)
    add_arguments(group, number) its own flags, in its own argparse group; train.py refuses them in other modes
    refusal(args, n)             why it cannot run with these flags (one line), or None
    build(args, model, splits, loader_kwargs, device, generator, valuation)  the method of a run

METHODS maps each --mode to its class; `register` adds one. The plain `Method` is --mode baseline; the paper's
method is SampleLevel (sample, Alg. 1), ModalityLevel (modality, Alg. 2) and Table 4's NaiveResampling and
ReversedResampling; comparators.py registers the methods the paper compares against.

Algorithms 1 and 2 print no line numbers; here line k is the k-th line the paper prints below "Require:", from
"for t = 0, ..., T - 1 do" (line 1). Algorithm 1: 2 "if t < F", 3 update with D, 4 "else", 5 D^rs = D, 6 "for
each sample x in D", 7 phi with Eq. 3, 8 "identify modality i where phi^i < 1", 9 s(x^i) with Eq. 10, 10 add x^i
s(x^i) times to D^rs, 12 update with D^rs. Algorithm 2: 6 "for each sample x in Z", 7 phi with Eq. 3, 9 the overall
low-contributing modality i, 10 p(i) with Eq. 11, 11-12 add x^i to D^rs with probability p(i), 14 update with D^rs.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Subset

import engine
import shapley_mm

METHODS = {}  # --mode -> Method class, in the order --help lists them


def register(cls):
    """Make `cls` (a Method subclass with its own `name`) a --mode of train.py; returns it (a class decorator)."""
    METHODS[cls.name] = cls
    return cls


@dataclass
class Plan:
    """One epoch's plan: its phase (the log's "phase"), the samples valued (valued [V], None if none), their
    contributions (phi [V, n]) and the uni-modal copies of D^rs (copies [N, n]; copies[k, i] extra copies of
    sample k keep modality i alone; None for none)."""
    phase: str
    valued: torch.Tensor = None
    phi: torch.Tensor = None
    copies: torch.Tensor = None


# ----------------------------------------------------------------------------------------------
# Alg. 1 line 7 / Alg. 2 line 7: the contributions of training samples, taken offline or online


class OfflineValuation:
    """phi as the paper takes it: the samples to value [V] valued now, in eval mode, with evaluation transforms
    (train_eval), in one pass (engine.valuation_pass: which coalitions predict each sample correctly), then Eq. 1-3.
    valuation(model, valued) -> phi [V, n]."""

    def __init__(self, train_eval, loader_kwargs, device, amp=False):
        self.train_eval, self.loader_kwargs, self.device, self.amp = train_eval, loader_kwargs, device, amp
        self.num_samples = len(train_eval)

    def __call__(self, model, valued):
        result = engine.valuation_pass(model, Subset(self.train_eval, valued.tolist()), self.loader_kwargs,
                                       self.device, self.amp)
        return shapley_mm.shapley_values(shapley_mm.benefit(result["correct"]))  # Eq. 1-3


class OnlineValuation:
    """phi taken inside the training steps (--valuation online, Sec. 3.2 with Eq. 1 read during training): the
    steps of epoch t record which coalitions predict each sample correctly (record), and epoch t + 1 is planned
    from them (valued). `table` holds correct [N, 2**n] bool and seen [N] bool while an epoch records, else None."""

    def __init__(self, num_samples, num_modalities):
        self.num_samples, self.num_modalities = num_samples, num_modalities
        self.table = None

    def start_recording(self, needed):
        """A fresh table for this epoch's steps if the next epoch's plan needs one, else none."""
        self.table = (dict(correct=torch.zeros(self.num_samples, 2 ** self.num_modalities, dtype=torch.bool),
                           seen=torch.zeros(self.num_samples, dtype=torch.bool)) if needed else None)

    @torch.no_grad()
    def record(self, model, features, target, index, mask):
        """One training batch: for the original rows (every modality kept; a uni-modal copy's sample is valued by
        its original row), the 2**n - 1 coalition predictions from the pooled features the step computed, outside
        its graph, the fusion head run per coalition with the absent features zeroed (feature masking), written at
        the rows' sample indices. features: one [B, d_i] per modality; target [B], mask [B, n]; index [B]."""
        original = mask.all(1)  # [B]
        if not original.any():
            return
        features = [feature[original] for feature in features]  # [B_o, d_i]
        correct, _ = shapley_mm.coalition_correctness(lambda keep: model.fuse(features, keep), target[original],
                                                      model.num_modalities)
        rows = index.cpu()[original.cpu()]
        self.table["correct"][rows] = correct.cpu()
        self.table["seen"][rows] = True

    def valued(self):
        """(the samples the previous epoch's steps saw [V], their phi [V, n]) from every process's table; (None,
        None) before any epoch recorded one. A process values the rows of its own batches: a sample is seen if any
        process saw it, and its row is the one that process wrote (processes sharing a padded batch write alike)."""
        if self.table is None:
            return None, None
        table = self.table
        if dist.is_initialized():
            table = {key: engine.sum_over_processes(value.to(torch.uint8), dist.ReduceOp.MAX).bool()
                     for key, value in table.items()}
        valued = table["seen"].nonzero().squeeze(1)  # Z is every sample seen
        return valued, shapley_mm.shapley_values(shapley_mm.benefit(table["correct"][valued]))  # Eq. 1-3


# ----------------------------------------------------------------------------------------------
# the base: plain joint training (--mode baseline)


@register
class Method:
    """Plain joint training of all modalities (--mode baseline), and what every mode shares. A method acts in its
    epochs from `warmup` to `last_epoch` (None: to the end); before, the phase is "warmup", after, "joint". With
    `track_phi` (--track-phi), `valuation` (OfflineValuation or OnlineValuation) values the whole training set
    every epoch for the log."""
    name = "baseline"
    about = "joint training of all modalities (the Concatenation rows of Tables 1-4)"
    fusion = None  # the one fusion the method needs; None: any
    resamples = False  # whether it plans uni-modal copies from valuations
    uses_warmup = False  # whether its first --warmup epochs are plain joint training (Alg. 1 / 2 lines 2-3)
    some_parameters_idle = False  # whether a step may leave some parameters without a gradient (DDP must know)

    def __init__(self, valuation=None, track_phi=False, warmup=0, last_epoch=None):
        self.valuation, self.track_phi = valuation, track_phi
        self.warmup, self.last_epoch = warmup, last_epoch
        self.active = False

    @staticmethod
    def add_arguments(group, number):
        """Declare the method's own flags in `group`, with the official code's defaults; `number` is train.py's
        ranged argparse type. A subclass that defines it gets a group of its own."""

    @classmethod
    def refusal(cls, args, num_modalities):
        """Why the method cannot run with these flags, in one line; None when it can."""
        return None

    @classmethod
    def build(cls, args, model, splits, loader_kwargs, device, generator, valuation):
        """The method of a run: its settings from the parsed flags `args`, with the model and the data it reads
        between epochs; `valuation` values the training samples (None unless the method or --track-phi needs it)."""
        return cls(valuation, args.track_phi)

    def phase(self, epoch):
        """Alg. 1 / 2 line 2: the warm-up, the method, or after --modulation-ends plain joint training."""
        if epoch < self.warmup:
            return "warmup"
        if self.last_epoch is not None and epoch > self.last_epoch:
            return "joint"
        return self.name

    def plan(self, epoch, model):
        """The epoch's plan, in Algorithm 1 / 2 order (a method that re-samples nothing values only for --track-phi
        and copies nothing)."""
        plan = Plan(self.phase(epoch))  # line 2: t < F is the warm-up (line 3), joint training on D
        acts = plan.phase == self.name
        if self.track_phi or (acts and self.resamples):  # lines 6-7: the contributions
            plan.valued, plan.phi = self.value(model, plan.phase)
        if acts and self.resamples and plan.phi is not None:  # lines 8-10: the copies that make D^rs (line 5)
            plan.copies = self.copies(plan.phi, plan.valued)
        self.next_epoch_valued(epoch)
        self.start_epoch(epoch, acts, model)
        return plan  # line 12: train.py trains the epoch on D^rs, the training set and these copies

    def samples_to_value(self, phase):
        """Line 6: every training sample."""
        return torch.arange(self.valuation.num_samples)

    def value(self, model, phase):
        """Lines 6-7: (valued [V], phi [V, n]). Offline, the samples of line 6 (samples_to_value) valued now; online,
        every sample the previous epoch's steps saw ((None, None) before any epoch recorded them), with no draw."""
        if isinstance(self.valuation, OnlineValuation):
            return self.valuation.valued()
        valued = self.samples_to_value(phase)
        return valued, self.valuation(model, valued)

    def next_epoch_valued(self, epoch):
        """Online valuation: this epoch's steps record what the next epoch's plan will value."""
        if isinstance(self.valuation, OnlineValuation):
            self.valuation.start_recording(self.track_phi or (self.resamples and epoch + 1 >= self.warmup))

    def start_epoch(self, epoch, active, model):
        self.active = active

    def loss(self, model, inputs, target, mask=None, index=None):
        if not isinstance(self.valuation, OnlineValuation) or self.valuation.table is None:
            return F.cross_entropy(model(inputs, mask).float(), target)
        features = model.encode(inputs, mask)  # encode, then fuse: online valuation reuses the step's features
        loss = F.cross_entropy(model.fuse(features).float(), target)
        self.valuation.record(model, features, target, index, mask)
        return loss

    def modulate(self, model):
        pass

    def end_epoch(self, epoch, model):
        pass

    def summary(self):
        return None

    def state_dict(self):
        return dict(online=self.valuation.table if isinstance(self.valuation, OnlineValuation) else None)

    def load_state_dict(self, state):
        if isinstance(self.valuation, OnlineValuation):
            self.valuation.table = state["online"]


# ----------------------------------------------------------------------------------------------
# the paper's method: Algorithm 1 (sample level), Algorithm 2 (modality level), Table 4's ablations


@register
class SampleLevel(Method):
    """Algorithm 1 (--mode sample): after F warm-up epochs of joint training (lines 2-3), every epoch values every
    training sample's modalities (lines 6-7, Eq. 1-3) and adds f_s(1 - phi^i) uni-modal copies of each modality
    contributing phi^i < 1 (lines 8-10, Eq. 10) to D^rs, the set the epoch trains on (line 12)."""
    name = "sample"
    about = "Algorithm 1: value every training sample (Eq. 1-3), re-sample its low-contributing modalities (Eq. 10)"
    resamples = True
    uses_warmup = True

    def __init__(self, valuation, generator, num_samples, track_phi=False, warmup=0):
        super().__init__(valuation, track_phi, warmup)
        self.generator, self.num_samples = generator, num_samples  # the training set's size, valued or not

    @classmethod
    def refusal(cls, args, num_modalities):
        if num_modalities < 2:
            return (f"--mode {args.mode} re-samples one modality against the others and needs at least two "
                    f"modalities; this run has {num_modalities} (use --mode baseline)")
        return None

    @classmethod
    def build(cls, args, model, splits, loader_kwargs, device, generator, valuation):
        return cls(valuation, generator, len(splits["train"]), args.track_phi, args.warmup)

    def copies(self, phi, valued):
        """Lines 8-10: copies [N, n], s(x^i) = f_s(1 - phi^i) uni-modal copies of each valued sample's modality i
        with phi^i < 1 (Eq. 10), none for the samples not valued."""
        copies = torch.zeros(self.num_samples, phi.shape[1], dtype=torch.long)
        copies[valued] = shapley_mm.sample_level_copies(phi)
        return copies


@register
class ModalityLevel(SampleLevel):
    """Algorithm 2 (--mode modality): after the warm-up, value a random subset Z of the training set (lines 6-7),
    find the modality i of lowest mean contribution over Z (line 9), and add a copy of x^i to D^rs for every
    training sample x with probability p(i) = f_m(Norm(d)) (lines 10-12, Eq. 11)."""
    name = "modality"
    about = "Algorithm 2: value a random subset Z, re-sample the overall low-contributing modality (Eq. 11)"

    def __init__(self, valuation, generator, num_samples, track_phi=False, warmup=0, subset_ratio=0.2, alpha=1.0,
                 f_m="linear"):
        super().__init__(valuation, generator, num_samples, track_phi, warmup)
        self.subset_ratio, self.alpha, self.f_m = subset_ratio, alpha, f_m

    @staticmethod
    def add_arguments(group, number):
        group.add_argument("--subset-ratio", type=number(float, 0.0, 1.0, low_open=True), default=0.2,
                           help="fraction of training samples in Z (default: %(default)s)")
        group.add_argument("--alpha", type=number(float, 0.0), default=1.0,
                           help="scale inside f_m (Eq. 11) (default: %(default)s)")
        group.add_argument("--f-m", default="linear", choices=shapley_mm.F_M_CHOICES,
                           help="f_m of Eq. 11 (default: %(default)s)")

    @classmethod
    def build(cls, args, model, splits, loader_kwargs, device, generator, valuation):
        return cls(valuation, generator, len(splits["train"]), args.track_phi, args.warmup, args.subset_ratio,
                   args.alpha, args.f_m)

    def samples_to_value(self, phase):
        """Line 6: a random subset Z of subset_ratio of the training samples where the method acts (every sample
        where only --track-phi values)."""
        if phase != self.name:
            return torch.arange(self.num_samples)
        subset_size = max(1, int(round(self.subset_ratio * self.num_samples)))
        return torch.randperm(self.num_samples, generator=self.generator)[:subset_size].sort().values

    def copies(self, phi, valued):
        """Lines 9-12: the modality of lowest mean phi over Z and p(i) (Eq. 11); one copy of x^i per sample with
        probability p(i)."""
        modality, probability = shapley_mm.modality_level_plan(phi, alpha=self.alpha, f_m=self.f_m)
        return shapley_mm.modality_level_copies(self.num_samples, phi.shape[1], modality, probability,
                                                generator=self.generator)


@register
class NaiveResampling(SampleLevel):
    """Table 4's naive re-sampling (--mode naive): as many uni-modal copies of each modality as Algorithm 1 would
    make, on samples drawn at random."""
    name = "naive"
    about = "Table 4: as many uni-modal copies per modality as `sample`, on random samples"

    def copies(self, phi, valued):
        return shapley_mm.naive_copies(super().copies(phi, valued), generator=self.generator)


@register
class ReversedResampling(SampleLevel):
    """Table 4's reversed re-sampling (--mode reversed): Algorithm 1's copies of each sample go to its
    highest-contributing modality instead."""
    name = "reversed"
    about = "Table 4: the copies go to each sample's highest-contributing modality"

    def copies(self, phi, valued):
        full_phi = torch.zeros(self.num_samples, phi.shape[1])
        full_phi[valued] = phi
        return shapley_mm.reversed_copies(full_phi, super().copies(phi, valued), generator=self.generator)

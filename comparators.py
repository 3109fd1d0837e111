"""The imbalanced-multimodal methods the paper compares against (Table 2, Figures 1, 3 and 4), in train.py's harness.

    ogm-ge     OGM-GE (Peng et al., CVPR 2022): the dominant modality's encoder gradients scaled down, plus noise
    greedy     Greedy (Wu et al., ICML 2022): MMTM's cross-modal path cut for the faster-learning modality
    pmr        PMR (Fan et al., CVPR 2023): a prototype cross-entropy for the weaker modality
    agm        AGM (Li et al., ICCV 2023): each encoder's gradients scaled by its response's loss gap
    gblending  Gradient-Blending (Wang et al., CVPR 2020): multimodal and uni-modal losses weighted by their
               overfitting-to-generalisation ratio

None of them re-samples (D^rs = D, no copies): each is a ComparedMethod, registered in method.METHODS under its
--mode, that changes the training step, with the loaders, models, schedule, logs and checkpoints of the other modes.
Each class declares its flags (add_arguments, the official code's defaults), its refusals and how it builds itself
(build); beside the base's loss, modulate, end_epoch(epoch, model), state_dict and summary, a method keeps its
epoch-level state in start_epoch(epoch, active, model) (PMR's prototypes, G-Blending's weights), which the base's
plan calls. state_dict() / load_state_dict() hold every running statistic, so a resumed run continues exactly. A
method acts in the epochs after the warm-up (--warmup, as every mode) up to --modulation-ends; greedy, agm and
gblending also measure during the warm-up, as their official code does from its first epoch.

Uni-modal responses go through the classifier's mask, so a method works with every fusion it is meaningful for.
The response of modality m to a batch is its Shapley value in the game whose value of a coalition C is the logits
from C alone, v(C) = f(x masked to C), v(empty) = 0 (unimodal_responses). For two modalities this is
(f(a, v) - f(0, v) + f(a, 0)) / 2, AGM's mono-modal response; for concatenation it equals W_a a + b / 2, the weight
slice plus half the bias that OGM-GE's code reads (test_comparators checks both); for sum fusion OGM-GE's code reads
each branch with its own bias, and so does OGMGE (branch_responses). Late fusion with feature masking
runs only the fusion head per coalition, on the features of the training forward itself; any other classifier runs
one forward per coalition.

Under torchrun every statistic is that of the global batch or of the whole data set, the same on every process: the
training step runs inside DistributedDataParallel (engine.TrainingStep), so the gradients a method changes are the
all-reduced ones; OGM-GE's scores, AGM's losses, PMR's prototype scores, Greedy's gate averages and G-Blending's
training losses are summed over the processes (engine.sum_over_processes); PMR's prototypes and G-Blending's
validation losses come from sharded, gathered passes (engine.evaluate); OGM-GE's noise is rank 0's draw.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

import engine
import models
import shapley_mm
from method import METHODS, Method, register

# AGM's code, (cap, clip): a coefficient's exponent is at most alpha * cap, and every gradient is clipped to norm
# `clip` when a gradient of the output layer's weight leaves [-clip, clip]. Two modalities: run/CREMAD_main.py,
# train (cap 10, lines 151-152; clip 1, lines 233-243); more: run/URFunny_main.py, train (cap 7, lines 128-130;
# clip 5, lines 203-207).
AGM_LIMITS_TWO, AGM_LIMITS_MORE = (10.0, 1.0), (7.0, 5.0)


class ComparedMethod(Method):
    """What the compared methods share: no copies (D^rs = D), a changed training step in the epochs after --warmup
    up to --modulation-ends, two or more modalities, and no online valuation (their losses record none)."""
    uses_warmup = True

    @staticmethod
    def add_arguments(group, number):
        group.add_argument("--modulation-ends", type=number(int, 0),
                           help="last epoch in which the compared method acts (it starts after --warmup); default: "
                                "the last epoch")

    @classmethod
    def refusal(cls, args, num_modalities):
        if num_modalities < 2:
            return (f"--mode {args.mode} balances modalities against each other and needs at least two; this run "
                    f"has {num_modalities} (use --mode baseline)")
        if args.modulation_ends is not None and args.modulation_ends < args.warmup:
            return (f"--modulation-ends {args.modulation_ends} is before the first epoch after the warm-up "
                    f"(--warmup {args.warmup}): --mode {args.mode} would never act; use --modulation-ends >= "
                    f"{args.warmup}")
        return None

    @staticmethod
    def schedule(args, valuation):
        """The base's settings of a compared method: --track-phi's valuation and the epochs it acts in."""
        return dict(valuation=valuation, track_phi=args.track_phi, warmup=args.warmup,
                    last_epoch=args.modulation_ends)


# ----------------------------------------------------------------------------------------------
# uni-modal responses through the classifier's mask


def shares_features(model):
    """Whether a coalition's logits are the fusion head on the training forward's own features: late fusion with
    feature masking, where removing a modality zeroes its pooled feature."""
    return isinstance(model, models.LateFusionClassifier) and model.mask_mode == "feature"


def joint_forward(model, inputs):
    """The training forward with every modality: (logits [B, K], the pooled features, one [B, d_i] per modality,
    where the coalitions can share them (shares_features), else None)."""
    if shares_features(model):
        features = model.encode(inputs)
        return model.fuse(features), features
    return model(inputs), None


def coalition_logits(model, inputs, features, members):
    """Logits [C, B, K] of the coalitions members [C, n] (bool) for one batch: the fusion head on `features` with
    the absent ones zeroed where features are given, else forward(inputs, mask), one pass per coalition."""
    batch = inputs[0].shape[0]
    if features is not None:
        return torch.stack([model.fuse(features, member.expand(batch, -1)) for member in members])
    return torch.stack([model(inputs, member.expand(batch, -1)) for member in members])


@contextlib.contextmanager
def evaluating(model):
    """Eval mode inside the block, the previous mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def unimodal_responses(model, inputs, features=None):
    """The Shapley response of every modality, [n, B, K]: phi_m of the game v(C) = logits from coalition C alone,
    v(empty) = 0 (shapley_mm.shapley_values on each logit). Without shared features, every coalition runs in eval
    mode, as AGM's code runs its masked forwards, so that BatchNorm's running statistics stay the training
    forwards' own."""
    n = model.num_modalities
    members = shapley_mm.coalitions(n).to(inputs[0].device)  # [2**n, n]
    with evaluating(model) if features is None else contextlib.nullcontext():
        return shapley_responses(coalition_logits(model, inputs, features, members[1:]))


def shapley_responses(logits):
    """[n, B, K]: the Shapley value of each modality in the game of the logits of the non-empty coalitions,
    logits [2**n - 1, B, K] laid out as shapley_mm.coalitions(n)[1:], with v(empty) = 0."""
    values = torch.cat([torch.zeros_like(logits[:1]), logits]).float()  # [2**n, B, K]
    coalitions, batch, classes = values.shape
    phi = shapley_mm.shapley_values(values.permute(1, 2, 0).reshape(batch * classes, coalitions))  # [B*K, n]
    return phi.view(batch, classes, -1).permute(2, 0, 1)


def true_class_probability(logits, target):
    """softmax(logits)[y] of each sample, [..., B] from logits [..., B, K] and target [B]: OGM-GE's per-sample
    confidence (the summand of its score s_m), which the Figure 4 analogue sets beside phi."""
    probability = logits.float().softmax(-1)
    return probability.gather(-1, target.view(-1, 1).expand(*logits.shape[:-1], 1)).squeeze(-1)


def read_confidence(model, inputs, target):
    """A read_batch for engine.evaluate: OGM-GE's confidence of each row, per modality, ogm_score [B, n] (the
    true-class softmax of each modality's Shapley response; the model in eval mode)."""
    members = shapley_mm.coalitions(model.num_modalities).to(target.device)
    predict = model.coalition_predictor(inputs)
    logits = torch.stack([predict(member.expand(len(target), -1)) for member in members[1:]])
    return dict(ogm_score=true_class_probability(shapley_responses(logits), target).T)


def encoder_weights(model, m):
    """The weight matrices and kernels (dim >= 2) of modality m's encoder, whose gradients OGM-GE changes; biases
    and BatchNorm's affine parameters are left alone."""
    return [p for p in model.encoders[m].parameters() if p.dim() >= 2 and p.grad is not None]


# ----------------------------------------------------------------------------------------------
# OGM-GE (Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022)


def ogm_coefficients(scores, alpha):
    """Eq. 10 of OGM-GE: k_m = 1 - tanh(alpha * rho_m) for a modality whose discrepancy ratio rho_m > 1, else 1.

    scores [n]: s_m, the sum over the batch of modality m's true-class softmax (Eq. 9). rho_m is s_m over the mean
    of the others' scores, s_v / s_a for two modalities as in the official code; so only a dominant modality is
    slowed down. (At exact equality, s_a = s_v, the official code slows the first modality; here none.)"""
    n = len(scores)
    others = (scores.sum() - scores) / (n - 1)  # [n], the mean score of the other modalities
    ratio = scores / others
    return torch.where(ratio > 1, 1 - torch.tanh(alpha * ratio), torch.ones_like(ratio))


def ogm_ge_step(model, coefficients):
    """OGM-GE's gradient change (Sec. 3.2-3.3): each encoder weight's gradient g becomes k_m * g + N(0, std(g)),
    the Gaussian noise of generalisation enhancement (GE) with the standard deviation of the unscaled gradient,
    as the official code draws it (std + 1e-8), for every modality."""
    for m, coefficient in enumerate(coefficients.tolist()):
        for p in encoder_weights(model, m):
            noise = engine.broadcast_tensor(torch.randn_like(p.grad)) * (p.grad.std() + 1e-8)  # one draw for all
            p.grad.mul_(coefficient).add_(noise)


class ResponseModulation(ComparedMethod):
    """What OGM-GE and AGM share: per batch, the modalities' responses give one coefficient per modality
    (coefficients_from, the method's rule) that changes the gradients (OGM-GE: each encoder's after backward, in
    modulate; AGM: the gradient through each response, in its loss). The coefficients' mean over the epoch's
    modulated steps is logged."""

    def __init__(self, num_modalities, **schedule):
        super().__init__(**schedule)
        self.coefficients = torch.ones(num_modalities, dtype=torch.float64)
        self.coefficient_sums, self.steps = torch.zeros(num_modalities, dtype=torch.float64), 0

    def start_epoch(self, epoch, active, model):
        self.active = active
        self.coefficient_sums, self.steps = torch.zeros_like(self.coefficient_sums), 0

    def loss(self, model, inputs, target, mask=None, index=None):
        logits, features = joint_forward(model, inputs)
        if self.active:
            self.record(unimodal_responses(model, inputs, features), target)
        return F.cross_entropy(logits.float(), target)

    def record(self, responses, target):
        """The step's coefficients from the responses [n, B, K], added to the epoch's sums."""
        self.coefficients = self.coefficients_from(true_class_probability(responses, target).cpu())
        self.coefficient_sums += self.coefficients
        self.steps += 1

    def summary(self):
        return dict(mean_coefficient=(self.coefficient_sums / max(self.steps, 1)).tolist())


def branch_responses(model, features):
    """[n, B, K]: each branch's own logits, fc_m(f_m) with its own bias, for sum fusion (models.SumFusion), where
    OGM-GE's code takes out_a = a W_x^T + b_x (main.py, train_epoch, fusion_method 'sum', lines 82-86); the
    Shapley response would give each branch half of every bias instead."""
    return torch.stack([fc(feature) for fc, feature in zip(model.head.fcs, features)])


def sums_branches(model):
    """Whether the model is late fusion by a sum of per-modality classifiers (--fusion sum)."""
    return isinstance(model, models.LateFusionClassifier) and isinstance(model.head, models.SumFusion)


@register
class OGMGE(ResponseModulation):
    """OGM-GE: per batch, the scores s_m of the modalities' responses (Eq. 9), the coefficients k_m
    (ogm_coefficients), and the change of the encoders' gradients (ogm_ge_step). No state between batches. The
    response is the Shapley response, except for sum fusion: each branch's own output (branch_responses)."""

    name = "ogm-ge"
    about = "OGM-GE (Peng et al., CVPR 2022): the dominant modality's encoder gradients scaled down, plus noise"

    def __init__(self, num_modalities, alpha, **schedule):
        super().__init__(num_modalities, **schedule)
        self.alpha = alpha

    @staticmethod
    def add_arguments(group, number):
        group.add_argument("--ogm-alpha", type=number(float, 0.0), default=0.1,
                           help="alpha in k = 1 - tanh(alpha * rho) (default: %(default)s)")

    @classmethod
    def build(cls, args, model, splits, loader_kwargs, device, generator, valuation):
        return cls(model.num_modalities, args.ogm_alpha, **cls.schedule(args, valuation))

    def loss(self, model, inputs, target, mask=None, index=None):
        if not (self.active and sums_branches(model)):
            return super().loss(model, inputs, target)
        features = model.encode(inputs)  # LateFusionClassifier.forward, keeping the features
        with torch.no_grad():
            self.record(branch_responses(model, features), target)
        return F.cross_entropy(model.fuse(features).float(), target)

    def coefficients_from(self, probability):  # [n, B], the true-class softmax of each response
        return ogm_coefficients(engine.sum_over_processes(probability.sum(1)), self.alpha)  # s_m, Eq. 9

    def modulate(self, model):
        if self.active:
            ogm_ge_step(model, self.coefficients)


# ----------------------------------------------------------------------------------------------
# Greedy (Wu et al., "Characterizing and Overcoming the Greedy Nature of Learning in Multi-modal Deep Neural
# Networks", ICML 2022; nyukat/greedy_multimodal_learning, src/callbacks.py and the balanced MMTM)


def learning_speed(parameters):
    """One step's squared gradient norm over squared weight norm, sum |g|^2 / sum |w|^2, of a group of
    parameters: the summand of the conditional learning speed (Sec. 4.2)."""
    grads = sum((p.grad.detach().float() ** 2).sum() for p in parameters if p.grad is not None)
    weights = sum((p.detach().float() ** 2).sum() for p in parameters)
    return float(grads / weights)


def greedy_trigger(bypass_speeds, main_speeds, epsilon):
    """Sec. 4.2: the modality whose cross-modal (bypass) path learns fastest relative to its own (main) path, when
    the conditional utilisation rates d_m = log10(bypass_m / main_m) of the running sums differ by more than
    epsilon (|d_0 - d_1| for two modalities, max - min for more); None otherwise."""
    rates = torch.log10(torch.as_tensor(bypass_speeds, dtype=torch.float64)
                        / torch.as_tensor(main_speeds, dtype=torch.float64))
    if rates.max() - rates.min() > epsilon:
        return int(rates.argmax())
    return None


@register
class Greedy(ComparedMethod):
    """Greedy's re-balancing step for MMTM: after every backward pass outside a curation window, the running sums
    of the learning speeds of each modality's main path (its encoder) and bypass path (MMTM's joint layer, shared,
    and its own excitation layer) are updated; when greedy_trigger names a modality, the next `window` steps replace
    that modality's MMTM gate, at every level, by its running average, so that its stream no longer depends on the
    other modalities. The gates are read and replaced by forward hooks on the excitation layers (training forwards
    only), so the classifier itself is unchanged."""

    name = "greedy"
    about = "Greedy (Wu et al., ICML 2022): MMTM's cross-modal path cut for the faster-learning modality"
    fusion = "mmtm"
    some_parameters_idle = True  # a replaced gate leaves its excitation layer without a gradient

    def __init__(self, model, epsilon, window, **schedule):
        super().__init__(**schedule)
        mixers = getattr(model, "mixers", None)
        if mixers is None or not all(isinstance(mixer, models.MMTM) for mixer in mixers):
            raise ValueError("greedy needs a classifier with MMTM modules (--fusion mmtm)")
        self.epsilon, self.window = epsilon, window
        self.n = model.num_modalities
        self.main = [list(encoder.parameters()) for encoder in model.encoders]
        shared = [p for mixer in mixers for p in mixer.joint.parameters()]
        self.bypass = [shared + [p for mixer in mixers for p in mixer.excitations[m].parameters()]
                       for m in range(self.n)]
        self.main_speed, self.bypass_speed = [0.0] * self.n, [0.0] * self.n
        self.gate_sums = [[torch.zeros(e.out_features) for e in mixer.excitations] for mixer in mixers]
        self.gate_steps = 0
        self.curated, self.curation_step = None, 0  # the modality whose gate is replaced, and for how long yet
        self.curated_steps = 0
        for level, mixer in enumerate(mixers):
            for m, excitation in enumerate(mixer.excitations):
                excitation.register_forward_hook(self.gate_hook(level, m))

    @staticmethod
    def add_arguments(group, number):
        group.add_argument("--greedy-epsilon", type=number(float, 0.0), default=0.01,
                           help="threshold on the gap of the conditional learning speeds (default: %(default)s)")
        group.add_argument("--greedy-window", type=number(int, 1), default=5,
                           help="steps of a curation window (default: %(default)s)")

    @classmethod
    def refusal(cls, args, num_modalities):
        if args.fusion != cls.fusion and num_modalities >= 2:
            return (f"--mode {args.mode} reads the learning speeds of MMTM's cross-modal path and needs --fusion "
                    f"{cls.fusion}, not {args.fusion}")
        return super().refusal(args, num_modalities)

    @classmethod
    def build(cls, args, model, splits, loader_kwargs, device, generator, valuation):
        return cls(model, args.greedy_epsilon, args.greedy_window, **cls.schedule(args, valuation))

    def gate_hook(self, level, m):
        def hook(module, args, output):  # output: E_m [B, C], the gate is 2 * sigmoid(E_m) (models.MMTM)
            if not module.training:
                return None
            if m == 0 and level == 0:
                self.gate_steps += 1
            gate = (2 * torch.sigmoid(output.detach().float())).mean(0).cpu()  # [C]
            self.gate_sums[level][m] += engine.mean_over_processes(gate)
            if self.curated != m:
                return None
            average = self.gate_sums[level][m] / self.gate_steps  # [C], in (0, 2)
            return torch.logit(average / 2).to(output).expand_as(output)  # 2 * sigmoid(.) = the running average
        return hook

    def start_epoch(self, epoch, active, model):
        self.active, self.curated_steps = active, 0

    def loss(self, model, inputs, target, mask=None, index=None):
        self.curated_steps += self.curated is not None
        return F.cross_entropy(model(inputs).float(), target)

    def modulate(self, model):
        if self.curated is not None:  # inside a curation window: count it down, no new speeds
            self.curation_step += 1
            if self.curation_step == self.window:
                self.curated = None
            return
        for m in range(self.n):
            self.main_speed[m] += learning_speed(self.main[m])
            self.bypass_speed[m] += learning_speed(self.bypass[m])
        if self.active:
            self.curated = greedy_trigger(self.bypass_speed, self.main_speed, self.epsilon)
            self.curation_step = 0

    def summary(self):
        return dict(curated_steps=self.curated_steps)

    def state_dict(self):
        return dict(main_speed=list(self.main_speed), bypass_speed=list(self.bypass_speed),
                    gate_sums=[[s.clone() for s in level] for level in self.gate_sums], gate_steps=self.gate_steps,
                    curated=self.curated, curation_step=self.curation_step)

    def load_state_dict(self, state):
        self.main_speed, self.bypass_speed = list(state["main_speed"]), list(state["bypass_speed"])
        self.gate_sums = [[s.clone() for s in level] for level in state["gate_sums"]]
        self.gate_steps, self.curated, self.curation_step = state["gate_steps"], state["curated"], state["curation_step"]


# ----------------------------------------------------------------------------------------------
# PMR (Fan et al., "PMR: Prototypical Modal Rebalance for Multimodal Learning", CVPR 2023;
# Modal-Imbalance-PMR, main_Prototype_grad.py)


def class_prototypes(features, labels, num_classes, previous=None, momentum=0.2):
    """Eq. 3 of PMR: the mean feature of each class, [K, d] from features [N, d] and labels [N], then the
    momentum update of the official code, (1 - momentum) * new + momentum * previous. A class without a sample
    keeps its previous prototype (zeros the first time)."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).to(features.dtype)  # [K]
    seen = counts > 0
    prototypes = previous.clone() if previous is not None else torch.zeros_like(sums)
    prototypes[seen] = sums[seen] / counts[seen, None]
    if previous is None:
        return prototypes
    return torch.where(seen[:, None], (1 - momentum) * prototypes + momentum * previous, previous)


def prototype_logits(features, prototypes):
    """Eq. 4 of PMR: minus the Euclidean distance of every feature [B, d] to every prototype [K, d], [B, K]."""
    return -torch.cdist(features.float(), prototypes.to(features.device).float())


def pmr_weights(prototype_scores, alpha):
    """PMR's rebalancing (Eq. 5-7 as the official code applies them): the prototype cross-entropy of a modality
    gets weight alpha when its prototype score (the batch sum of its true-class prototype softmax) is below the
    highest, 0 otherwise; for two modalities, the weaker one by the ratio of the scores, none at equality."""
    return torch.where(prototype_scores < prototype_scores.max(), alpha, 0.0)


def read_features(model, inputs, target):
    """A read_batch for engine.evaluate: each modality's pooled encoder feature, feature_m [B, d_m]."""
    return {f"feature_{m}": feature.float() for m, feature in enumerate(model.encode(inputs))}


@register
class PMR(ComparedMethod):
    """PMR: prototypes per modality and class from a random --pmr-fraction of the training samples (evaluation
    transforms, eval mode) at the start of every epoch in which the method acts, with momentum; the loss adds
    alpha * CE(-distance(feature, prototypes)) for the weaker modalities (pmr_weights)."""
    name = "pmr"
    about = "PMR (Fan et al., CVPR 2023): a prototype cross-entropy for the weaker modality"

    def __init__(self, num_modalities, train_eval, loader_kwargs, device, generator, alpha, momentum, fraction,
                 amp=False, **schedule):
        super().__init__(**schedule)
        self.train_eval, self.loader_kwargs, self.device, self.generator = train_eval, loader_kwargs, device, generator
        self.alpha, self.momentum, self.fraction, self.amp = alpha, momentum, fraction, amp
        self.prototypes = None  # one [K, d_m] per modality
        self.weight_sums, self.steps = torch.zeros(num_modalities), 0

    @staticmethod
    def add_arguments(group, number):
        group.add_argument("--pmr-alpha", type=number(float, 0.0), default=1.0,
                           help="weight of the prototype cross-entropy (default: %(default)s)")
        group.add_argument("--pmr-momentum", type=number(float, 0.0, 1.0), default=0.2,
                           help="share of the previous prototypes in each update (default: %(default)s)")
        group.add_argument("--pmr-fraction", type=number(float, 0.0, 1.0, low_open=True), default=0.1,
                           help="fraction of the training set the prototypes are computed from (default: "
                                "%(default)s)")

    @classmethod
    def refusal(cls, args, num_modalities):
        if num_modalities >= 2 and not issubclass(models.classifier_kind(args.fusion), models.LateFusionClassifier):
            return (f"--mode {args.mode} builds prototypes from each modality's own pooled feature; --fusion "
                    f"{args.fusion} mixes the modalities inside the network and has none (use a late fusion: "
                    f"{', '.join(models.FUSION_HEADS)})")
        return super().refusal(args, num_modalities)

    @classmethod
    def build(cls, args, model, splits, loader_kwargs, device, generator, valuation):
        return cls(model.num_modalities, splits["train_eval"], loader_kwargs, device, generator, args.pmr_alpha,
                   args.pmr_momentum, args.pmr_fraction, args.amp, **cls.schedule(args, valuation))

    def update_prototypes(self, model):
        count = max(1, int(round(self.fraction * len(self.train_eval))))
        chosen = torch.randperm(len(self.train_eval), generator=self.generator)[:count].tolist()
        read = engine.evaluate(model, Subset(self.train_eval, chosen), read_features, self.loader_kwargs,
                               self.device, self.amp)
        previous = self.prototypes or [None] * model.num_modalities
        self.prototypes = [class_prototypes(read[f"feature_{m}"], read["labels"], model.num_classes, p,
                                            self.momentum) for m, p in enumerate(previous)]

    def start_epoch(self, epoch, active, model):
        self.active = active
        self.weight_sums, self.steps = torch.zeros_like(self.weight_sums), 0
        if active:
            self.update_prototypes(model)

    def loss(self, model, inputs, target, mask=None, index=None):
        features = model.encode(inputs)
        loss = F.cross_entropy(model.fuse(features).float(), target)
        if not self.active:
            return loss
        distances = [prototype_logits(f, p) for f, p in zip(features, self.prototypes)]  # n x [B, K]
        with torch.no_grad():
            scores = engine.sum_over_processes(torch.stack([true_class_probability(d, target).sum()
                                                            for d in distances]).cpu())
        weights = pmr_weights(scores, self.alpha)
        self.weight_sums += weights
        self.steps += 1
        return loss + sum(w * F.cross_entropy(d, target) for w, d in zip(weights.tolist(), distances) if w)

    def summary(self):
        return dict(mean_prototype_weight=(self.weight_sums / max(self.steps, 1)).tolist())

    def state_dict(self):
        return dict(prototypes=self.prototypes)

    def load_state_dict(self, state):
        self.prototypes = state["prototypes"]


# ----------------------------------------------------------------------------------------------
# AGM (Li et al., "Boosting Multi-modal Model Performance with Adaptive Gradient Modulation", ICCV 2023)


def agm_limits(n):
    """(cap, clip) of AGM's code for n modalities: AGM_LIMITS_TWO for two, AGM_LIMITS_MORE for more."""
    return AGM_LIMITS_TWO if n == 2 else AGM_LIMITS_MORE


def agm_coefficients(losses, running_losses, alpha):
    """AGM's coefficients (Sec. 3.3, as its code computes them): with s_m the batch's cross-entropy of modality m's
    Shapley response and s-hat_m its running mean over the previous steps,

        r_m = exp(n / (n - 1) * (mean s - s_m)),   eta_m = exp(n / (n - 1) * (mean s-hat - s-hat_m)),
        k_m = exp(alpha * min(eta_m - r_m, cap)),

    cap from agm_limits(n). A modality whose loss is above its share of the history (r_m < eta_m) gets k_m > 1.
    Two modalities: r_a = exp(s_v - s_a) (run/CREMAD_main.py, train, lines 145-152); n: run/URFunny_main.py,
    train, lines 117-130. losses, running_losses: [n]; returns k [n]."""
    n = len(losses)
    cap, _ = agm_limits(n)
    ratio = torch.exp(n / (n - 1) * (losses.mean() - losses))
    target_ratio = torch.exp(n / (n - 1) * (running_losses.mean() - running_losses))
    return torch.exp(alpha * torch.clamp(target_ratio - ratio, max=cap))


def agm_game_logits(model, inputs, logits, features):
    """The logits [2**n - 1, B, K] of the non-empty coalitions laid out as shapley_mm.coalitions(n)[1:], with
    gradient: N is the training forward's `logits`, as AGM's GradMod.forward (model/CREMAD_net.py) takes
    total_out in train mode; the others come from coalition_logits, in eval mode where no features are shared (as
    its padded forwards run, with gradient)."""
    members = shapley_mm.coalitions(model.num_modalities).to(logits.device)[1:-1]  # every coalition but N
    with evaluating(model) if features is None else contextlib.nullcontext():
        partial = coalition_logits(model, inputs, features, members)
    return torch.cat([partial, logits[None]])


def agm_modulated_logits(responses, coefficients):
    """sum_m phi_m [B, K] from responses [n, B, K], with the gradient that reaches phi_m multiplied by k_m: AGM's
    loss CE(m_a + m_v) with the backward hooks (hooka, hookv) that scale each mono-modal response's gradient by its
    coefficient (model/CREMAD_net.py, GradMod). The value is sum_m phi_m = f(N); the gradient of every parameter
    (encoder weights, biases, BatchNorm, the fusion head) is sum_m k_m * dCE/dout * dphi_m/dtheta."""
    k = coefficients.to(responses)[:, None, None]
    return (k * responses + (1 - k) * responses.detach()).sum(0)


def output_layer_weights(model):
    """The weight matrices of the layers that output the logits (one per modality for sum and decision fusion),
    whose gradient range decides AGM's clip (its code reads fusion_module.fc_out.weight, or head.fc.weight)."""
    head = model.head
    layers = head.fcs if hasattr(head, "fcs") else [getattr(head, "fc", head)]
    return [layer.weight for layer in layers]


@register
class AGM(ResponseModulation):
    """AGM: every step, from the first (the warm-up included, as its code keeps the running scores from epoch 1),
    the cross-entropies s_m of the modalities' Shapley responses and their running mean; in the epochs the method
    acts, the coefficients (agm_coefficients) scale the gradient through each response (agm_modulated_logits), and
    every gradient is clipped to norm `clip` when an output-layer weight gradient leaves [-clip, clip]
    (agm_limits)."""

    name = "agm"
    about = "AGM (Li et al., ICCV 2023): each encoder's gradients scaled by its response's loss gap"

    def __init__(self, num_modalities, alpha, **schedule):
        super().__init__(num_modalities, **schedule)
        self.alpha = alpha
        self.running_losses, self.running_steps = torch.zeros(num_modalities, dtype=torch.float64), 0

    @staticmethod
    def add_arguments(group, number):
        group.add_argument("--agm-alpha", type=number(float, 0.0), default=1.0,
                           help="alpha in exp(alpha * (eta - r)) (default: %(default)s, AGM's utils/config.py)")

    @classmethod
    def build(cls, args, model, splits, loader_kwargs, device, generator, valuation):
        return cls(model.num_modalities, args.agm_alpha, **cls.schedule(args, valuation))

    def coefficients_from(self, probability):  # [n, B], the true-class softmax of each response
        # [n]; AGM's code: a probability >= 1e-8
        losses = engine.mean_over_processes((-probability.clamp(min=1e-8).log()).mean(1).double())
        coefficients = agm_coefficients(losses, self.running_losses, self.alpha)
        self.running_steps += 1  # AGM's code: train_score * (iteration - 1) / iteration + score / iteration
        self.running_losses += (losses - self.running_losses) / self.running_steps
        return coefficients

    def loss(self, model, inputs, target, mask=None, index=None):
        logits, features = joint_forward(model, inputs)
        with torch.set_grad_enabled(self.active):  # measured only, without gradient, where the method does not act
            responses = shapley_responses(agm_game_logits(model, inputs, logits, features))  # [n, B, K]
        coefficients = self.coefficients_from(true_class_probability(responses.detach(), target).cpu())
        if not self.active:
            return F.cross_entropy(logits.float(), target)
        self.coefficients = coefficients
        self.coefficient_sums += coefficients
        self.steps += 1
        return F.cross_entropy(agm_modulated_logits(responses, coefficients).float(), target)

    def modulate(self, model):
        if not self.active:
            return
        _, clip = agm_limits(len(self.coefficients))
        if any(w.grad is not None and w.grad.abs().max() > clip for w in output_layer_weights(model)):
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip)

    def state_dict(self):
        return dict(running_losses=self.running_losses.clone(), running_steps=self.running_steps)

    def load_state_dict(self, state):
        self.running_losses, self.running_steps = state["running_losses"].clone(), state["running_steps"]


# ----------------------------------------------------------------------------------------------
# Gradient-Blending (Wang et al., "What Makes Training Multi-Modal Classification Networks Hard?", CVPR 2020)


def blending_weights(train_first, val_first, train_last, val_last):
    """G-Blending's weights (Sec. 3.2, Proposition 1 and its estimate): for each head k, from its training and
    validation losses at the start (first) and end (last) of a super-epoch, the generalisation
    G_k = L^V_first - L^V_last and the overfitting O_k = (L^V_last - L^T_last) - (L^V_first - L^T_first), and
    w_k = |G_k| / O_k^2, normalised to sum 1. Arguments: [H] each; returns [H], or None when O_k = 0 for some head
    or every G_k = 0 (no estimate)."""
    generalisation = val_first - val_last
    overfitting = (val_last - train_last) - (val_first - train_first)
    if (overfitting == 0).any() or (generalisation == 0).all():
        return None
    weights = generalisation.abs() / overfitting ** 2
    return weights / weights.sum()


def head_members(n):
    """The heads of G-Blending as coalitions, [n + 1, n] bool: all modalities, then each modality alone."""
    return torch.cat([torch.ones(1, n, dtype=torch.bool), torch.eye(n, dtype=torch.bool)])


def read_head_losses(model, inputs, target):
    """A read_batch for engine.evaluate: each row's cross-entropy under every head, head_loss [B, n + 1] (forward
    with only the head's modalities kept)."""
    predict = model.coalition_predictor(inputs)
    members = head_members(model.num_modalities).to(target.device)
    return dict(head_loss=torch.stack([F.cross_entropy(predict(member.expand(len(target), -1)).float(), target,
                                                       reduction="none") for member in members], 1))


@register
class GBlending(ComparedMethod):
    """Online G-Blending: the loss is sum_k w_k CE_k over the heads k = all modalities, then each modality alone
    (through the mask, sharing the fusion head). Every epoch records each head's training loss (the mean over the
    epoch's batches) and validation loss (read_head_losses over the validation set after the epoch), from the first
    epoch on. At the start of every super-epoch (epochs warmup, warmup + S, ...) the weights are re-estimated
    (blending_weights) from the first and last epochs of the S epochs before it (the warm-up for the first); uniform
    weights while there is no estimate."""

    name = "gblending"
    about = ("Gradient-Blending (Wang et al., CVPR 2020): multimodal and uni-modal losses weighted by their "
             "overfitting-to-generalisation ratio")

    def __init__(self, num_modalities, val_set, loader_kwargs, device, super_epoch, amp=False, **schedule):
        super().__init__(**schedule)
        self.val_set, self.loader_kwargs, self.device, self.super_epoch, self.amp = (val_set, loader_kwargs, device,
                                                                                     super_epoch, amp)
        n = num_modalities
        self.members = head_members(n)  # [n + 1, n]
        self.weights = torch.full((n + 1,), 1.0 / (n + 1), dtype=torch.float64)
        self.train_losses, self.val_losses = {}, {}  # epoch -> [n + 1]
        self.loss_sums, self.steps = torch.zeros(n + 1, dtype=torch.float64), 0

    @staticmethod
    def add_arguments(group, number):
        group.add_argument("--super-epoch", type=number(int, 2), default=10,
                           help="epochs between two estimates of the loss weights (default: %(default)s)")

    @classmethod
    def build(cls, args, model, splits, loader_kwargs, device, generator, valuation):
        return cls(model.num_modalities, splits["val"], loader_kwargs, device, args.super_epoch, args.amp,
                   **cls.schedule(args, valuation))

    def start_epoch(self, epoch, active, model):
        self.active = active
        self.loss_sums, self.steps = torch.zeros_like(self.loss_sums), 0
        if active and (epoch - self.warmup) % self.super_epoch == 0:
            window = [e for e in range(max(0, epoch - self.super_epoch), epoch) if e in self.val_losses]
            if len(window) >= 2:
                first, last = window[0], window[-1]
                weights = blending_weights(self.train_losses[first], self.val_losses[first],
                                           self.train_losses[last], self.val_losses[last])
                if weights is not None:
                    self.weights = weights

    def loss(self, model, inputs, target, mask=None, index=None):
        logits, features = joint_forward(model, inputs)
        members = self.members[1:].to(target.device)
        if self.active:
            alone = coalition_logits(model, inputs, features, members)  # [n, B, K]
        else:  # only measured: no gradient, and eval mode where the heads need forwards of their own
            with torch.no_grad(), evaluating(model) if features is None else contextlib.nullcontext():
                alone = coalition_logits(model, inputs, features, members)
        losses = torch.stack([F.cross_entropy(logits.float(), target)]
                             + [F.cross_entropy(a.float(), target) for a in alone])  # [n + 1]
        self.loss_sums += losses.detach().double().cpu()
        self.steps += 1
        if not self.active:
            return losses[0]
        return (self.weights.to(losses) * losses).sum()

    def end_epoch(self, epoch, model):
        totals = engine.sum_over_processes(torch.cat([self.loss_sums, torch.tensor([self.steps], dtype=torch.float64)]))
        self.train_losses[epoch] = totals[:-1] / max(totals[-1].item(), 1)  # the mean over every process's steps
        read = engine.evaluate(model, self.val_set, read_head_losses, self.loader_kwargs, self.device, self.amp)
        self.val_losses[epoch] = read["head_loss"].double().mean(0)

    def summary(self):
        return dict(weights=self.weights.tolist())

    def state_dict(self):
        return dict(weights=self.weights.clone(), train_losses=dict(self.train_losses),
                    val_losses=dict(self.val_losses))

    def load_state_dict(self, state):
        self.weights = state["weights"].clone()
        self.train_losses, self.val_losses = dict(state["train_losses"]), dict(state["val_losses"])


COMPARED_MODES = tuple(name for name, cls in METHODS.items() if issubclass(cls, ComparedMethod))  # Table 2's

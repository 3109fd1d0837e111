"""Encoders, fusion designs and the maskable multimodal classifier H(.) of the paper (Sec. 3.1).

Each modality has its own encoder (ResNet-18 for images, spectrograms, RGB and optical-flow clips; a small MLP for
vector views; for MBT, a ViT stack per modality). The fusion designs of Tables 1 and 3 come in two kinds of
classifier over one base, MultimodalClassifier, which checks inputs and masks:

  LateFusionClassifier (concat, sum, decision, film, gated): each encoder pools its modality to one feature vector
      on its own (encode), and a fusion head maps the pooled features to logits (fuse);
  InteractionClassifier: the modalities mix inside the network (interact). StageMixingClassifier (centralnet,
      mmtm): the encoders' stages are walked in lock-step and modules between the stages mix the modalities
      (CentralNet, Vielzeuf et al. 2018; MMTM, Joze et al. 2020); BottleneckClassifier (mbt): per-modality
      transformer layers that exchange information only through shared bottleneck tokens (MBT, Nagrani et al.
      2021).

forward(inputs, mask) takes a BoolTensor mask [B, n] of the modalities each row keeps, which is how the paper
builds the prediction from a coalition C of modalities (Eq. 1) and the uni-modal copies of re-sampling (Alg. 1
and 2). A kind's MASKS are the ways it can remove a modality, its default first:

  "feature" (the authors' code; late fusion's default): an absent modality's pooled feature is zeroed before the
      head;
  "input" (the paper's text; the only way for interaction, where no modality has a feature of its own to zero):
      an absent modality's input is zeroed before its encoder; MBT leaves its tokens out altogether.

coalition_predictor(inputs) values all 2^n - 1 coalitions of a batch: late fusion encodes the batch once and runs
only the fusion head per coalition (about one forward pass in all); interaction runs the whole network once per
coalition, each time as one batched call over the whole batch.

build_model(input_specs, num_classes, fusion, mask_mode, mbt=sizes) builds the kind of classifier a fusion needs
(CLASSIFIERS), and allowed_masks(fusion) says which maskings that kind allows.

Re-sampled batches can hold a single row that keeps a modality. The BatchNorm layers (BatchNorm1d, BatchNorm2d)
then normalise that sample with its own statistics over H, W wherever it has more than one value per channel, and
with the running statistics elsewhere (an MLP layer, a 1 x 1 map).
"""

import hashlib
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.vision_transformer import EncoderBlock

KINDS = ("image", "video", "vector")


# ----------------------------------------------------------------------------------------------
# BatchNorm for re-sampled batches
#
# A training batch can hold a single row that keeps a given modality (a shuffled mix of full samples and uni-modal
# copies, the last batch of an epoch, small batches, many modalities), and that modality's encoder then trains on
# one sample. A convolution still gives H * W values per channel for it, and they are normalised with their own
# statistics, as torch's BatchNorm2d does for a batch of one. Only a layer that sees a single value per channel (an
# MLP layer [1, C], a 1 x 1 map [1, C, 1, 1]) has no statistics of its own and uses its running statistics. One
# sample is no batch to estimate them from, so it leaves them as they are. Running statistics for every layer would
# not do: after a short warm-up they are barely initialised, and a ResNet normalised with them amplifies its
# activations stage after stage, up to inf.


class SingleSampleBatchNorm:
    """The forward of BatchNorm1d and BatchNorm2d below: torch's BatchNorm, except for a training input of a single
    sample, which is normalised with its own statistics over H, W (or, with one value per channel, with the running
    statistics) and does not update the running statistics."""

    def forward(self, x):
        if not (self.training and x.shape[0] == 1):
            return super().forward(x)
        if x.numel() == x.shape[1]:  # [1, C] or [1, C, 1, 1]: one value per channel, no statistics of its own
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                                eps=self.eps)
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)


class BatchNorm1d(SingleSampleBatchNorm, nn.BatchNorm1d):
    """nn.BatchNorm1d (same parameters and buffers) that trains a single sample [1, C] on its running statistics."""


class BatchNorm2d(SingleSampleBatchNorm, nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters and buffers) that trains a single sample [1, C, H, W] on its own statistics
    over H, W (on its running statistics where H = W = 1)."""


# ----------------------------------------------------------------------------------------------
# encoders: each one maps a modality's batch to pooled features [B, out_dim] by walking its stages


def adapt_first_conv(weight, channels):
    """ImageNet RGB kernels [64, 3, 7, 7] -> kernels for `channels` input channels [64, channels, 7, 7].

    For any channel count other than 3 (1 for spectrograms, 2 for optical flow u/v), every new input channel gets
    the mean of the three RGB kernels (the cross-modality initialisation of TSN, Wang et al. 2016): the filters
    keep their spatial patterns, and a grey input x in every channel gives `channels / 3` times the response
    the RGB net gives to x in all three channels. Three channels keep the RGB kernels unchanged."""
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"adapt_first_conv: expected RGB kernels [out, 3, kh, kw], got {list(weight.shape)}")
    if channels < 1:
        raise ValueError(f"adapt_first_conv: channels must be >= 1, got {channels}")
    if channels == 3:
        return weight
    return weight.mean(dim=1, keepdim=True).repeat(1, channels, 1, 1)


IMAGENET_RESNET18_URL = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url  # .../resnet18-f37072fd.pth


def load_imagenet_resnet18_state(path=None):
    """The state dict of torchvision's ImageNet ResNet-18 (ResNet18_Weights.IMAGENET1K_V1): from `path`, a copy of
    that file downloaded beforehand, whose SHA-256 must begin with the 8 hex digits torchvision's file name gives
    (as torch.hub checks); or, with path None, from the torch hub cache, downloaded into it if needed. A
    RuntimeError says what is wrong and where to put the file."""
    url = IMAGENET_RESNET18_URL
    file_name = url.rsplit("/", 1)[-1]
    if path is not None:
        expected = file_name.rsplit("-", 1)[-1].split(".")[0]
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if not digest.startswith(expected):
            raise RuntimeError(f"{path}: SHA-256 {digest[:8]}... is not that of torchvision's ImageNet ResNet-18 "
                               f"({expected}...); download {url}")
        return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True)
    except Exception as error:  # no network, a failed download, or a corrupt cached file
        cache_path = f"{torch.hub.get_dir()}/checkpoints/{file_name}"
        raise RuntimeError(
            f"could not load the ImageNet ResNet-18 weights ({error}). Without network access, download {url} on "
            f"another machine and pass it with --weights FILE (or place it at {cache_path}, torch hub's cache), or "
            f"train without --pretrained") from error


class ResNetEncoder(nn.Module):
    """torchvision's ResNet-18 without its classifier: [B, C, H, W] -> [B, 512].

    Video clips [B, C, T, H, W] fold T into the batch, and the pooled features of the T frames are averaged (as the
    authors' code does for its three visual frames). The stages (stem, layer1..layer4, pool) are the children of
    `self.stages`, so cross-modal modules can be placed between them."""

    def __init__(self, channels, video=False, pretrained=False):
        super().__init__()
        net = torchvision.models.resnet18(weights=None, norm_layer=BatchNorm2d)
        if channels != 3:
            net.conv1 = nn.Conv2d(channels, net.conv1.out_channels, kernel_size=7, stride=2, padding=3, bias=False)
        if pretrained:  # True: torch hub's copy; a path: a local copy of the same file
            state = load_imagenet_resnet18_state(None if pretrained is True else pretrained)
            state["conv1.weight"] = adapt_first_conv(state["conv1.weight"], channels)
            net.load_state_dict(state)
        self.video = video
        self.out_dim = net.fc.in_features  # 512
        self.stages = nn.Sequential(OrderedDict(
            stem=nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
            layer1=net.layer1,
            layer2=net.layer2,
            layer3=net.layer3,
            layer4=net.layer4,
            pool=nn.Sequential(net.avgpool, nn.Flatten(1)),
        ))

    def to_frames(self, x):
        """Video [B, C, T, H, W] -> ([B*T, C, H, W], T); an image batch is returned as is, with T = 1."""
        if not self.video:
            return x, 1
        return x.transpose(1, 2).flatten(0, 1), x.shape[2]

    def from_frames(self, features, frames):
        """[B*T, 512] -> [B, 512]: the mean of each sample's T frame features."""
        return features.view(-1, frames, self.out_dim).mean(dim=1)

    def forward(self, x):
        x, frames = self.to_frames(x)
        for stage in self.stages:
            x = stage(x)
        return self.from_frames(x, frames)


class MLPEncoder(nn.Module):
    """A small MLP for vector views: [B, D] -> 256 -> 128, each layer Linear + BatchNorm1d + ReLU."""

    def __init__(self, in_dim, hidden_dims=(256, 128)):
        super().__init__()
        layers, dim = OrderedDict(), in_dim
        for index, hidden in enumerate(hidden_dims, start=1):
            layers[f"layer{index}"] = nn.Sequential(nn.Linear(dim, hidden), BatchNorm1d(hidden), nn.ReLU(inplace=True))
            dim = hidden
        self.stages = nn.Sequential(layers)
        self.out_dim = dim

    def to_frames(self, x):
        """A vector view has no frames: [B, D] is returned as is, with T = 1 (as ResNetEncoder.to_frames)."""
        return x, 1

    def from_frames(self, features, frames):
        """[B, d] as is (as ResNetEncoder.from_frames with T = 1)."""
        return features

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return x


def build_encoder(kind, channels, pretrained=False):
    """The encoder of one modality, with attribute out_dim: ResNet-18 for "image" [B, C, H, W] and "video"
    [B, C, T, H, W] (channels = C), from ImageNet weights if pretrained; MLP for "vector" [B, D] (channels = D)."""
    if kind not in KINDS:
        raise ValueError(f"unknown modality kind {kind!r}; expected one of {KINDS}")
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ValueError(f"channels of a {kind!r} modality must be a positive integer, got {channels!r}")
    if kind == "vector":
        if pretrained:
            raise ValueError("pretrained=True: there are no pretrained weights for the MLP of a 'vector' modality")
        return MLPEncoder(channels)
    return ResNetEncoder(channels, video=(kind == "video"), pretrained=pretrained)


def build_encoders(input_specs, pretrained=False):
    """One encoder per (kind, channels) of input_specs (build_encoder), in an nn.ModuleList. pretrained applies to
    the ResNets; vector encoders start from scratch."""
    if pretrained and all(kind == "vector" for kind, _ in input_specs):
        raise ValueError("pretrained=True needs an 'image' or 'video' modality; all of input_specs are vectors")
    return nn.ModuleList(build_encoder(kind, channels, pretrained if kind != "vector" else False) for kind, channels in input_specs)


# ----------------------------------------------------------------------------------------------
# fusion heads: pooled features (list of [B, d_i]) -> logits [B, K]
#
# No head reads the mask: an absent modality reaches the head as the feature that replaced it (zeros in feature
# mode, its encoder's answer to an all-zero input in input mode), so both mask modes mean exactly what they say
# for every fusion.


class ConcatFusion(nn.Module):
    """The paper's default: Linear(sum d_i, K) over the concatenated features."""

    def __init__(self, feature_dims, num_classes):
        super().__init__()
        self.fc = nn.Linear(sum(feature_dims), num_classes)

    def forward(self, features):
        return self.fc(torch.cat(features, dim=1))


class SumFusion(nn.Module):
    """OGM-GE's sum fusion: sum over modalities of Linear(d_i, K). An absent modality adds only its bias."""

    def __init__(self, feature_dims, num_classes):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(dim, num_classes) for dim in feature_dims)

    def forward(self, features):
        return sum(fc(feature) for fc, feature in zip(self.fcs, features))


class DecisionFusion(nn.Module):
    """Late fusion: each modality its own classifier Linear(d_i, K), logits averaged over the modalities. An absent
    modality votes with its classifier's answer to the feature that replaced it (its bias in feature mode)."""

    def __init__(self, feature_dims, num_classes):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(dim, num_classes) for dim in feature_dims)

    def forward(self, features):
        return torch.stack([fc(feature) for fc, feature in zip(self.fcs, features)]).mean(dim=0)


class FiLMFusion(nn.Module):
    """FiLM (Perez et al. 2018) as OGM-GE uses it: (gamma, beta) = Linear(f_a) modulate the other modality's
    feature, gamma * h + beta, then Linear -> K.

    For n modalities the last one is modulated, after projection to a common width (h = Linear(f_n)), and the
    others modulate it in turn: h <- gamma_i(f_i) * h + beta_i(f_i) for i = 1 .. n-1. For two modalities this is
    OGM-GE's x_film=True (modality 1, e.g. audio, modulates modality 2).

    A missing modality: an absent conditioning modality applies one fixed modulation, (gamma, beta) = its layer's
    bias in feature mode (zero feature) or its layer's answer to the encoder's zero-input feature in input mode
    (constant in eval mode); an absent modulated modality leaves h = the projection's bias (feature mode) or the
    projection of the zero-input feature (input mode) for the others to modulate. So a uni-modal copy keeping only
    the modulated modality trains it through fixed affine maps, and one keeping only a conditioning modality
    predicts from the modulation it applies to a constant h."""

    def __init__(self, feature_dims, num_classes):
        super().__init__()
        width = max(feature_dims)
        self.project = nn.Linear(feature_dims[-1], width)
        self.films = nn.ModuleList(nn.Linear(dim, 2 * width) for dim in feature_dims[:-1])
        self.fc = nn.Linear(width, num_classes)

    def forward(self, features):
        h = self.project(features[-1])  # [B, width]
        for film, feature in zip(self.films, features[:-1]):
            gamma, beta = film(feature).chunk(2, dim=1)
            h = gamma * h + beta
        return self.fc(h)


class GatedFusion(nn.Module):
    """Gated fusion (Kiela et al. 2018) as OGM-GE uses it: a sigmoid gate from one modality multiplies the other's
    projected feature, then Linear -> K.

    For n modalities the last one is gated, after projection (h = Linear(f_n)), by each other modality in turn:
    h <- sigmoid(Linear(f_i)) * h for i = 1 .. n-1. For two modalities this is OGM-GE's x_gate=True. An absent
    gating modality (zero feature in feature mode) applies the fixed gate sigmoid(bias); an absent gated
    modality leaves h = the projection's bias."""

    def __init__(self, feature_dims, num_classes):
        super().__init__()
        width = max(feature_dims)
        self.project = nn.Linear(feature_dims[-1], width)
        self.gates = nn.ModuleList(nn.Linear(dim, width) for dim in feature_dims[:-1])
        self.fc = nn.Linear(width, num_classes)

    def forward(self, features):
        h = self.project(features[-1])  # [B, width]
        for gate, feature in zip(self.gates, features[:-1]):
            h = torch.sigmoid(gate(feature)) * h
        return self.fc(h)


# late fusion: fusion name -> head class, built as head(feature_dims, num_classes)
FUSION_HEADS = {
    "concat": ConcatFusion,
    "sum": SumFusion,
    "decision": DecisionFusion,
    "film": FiLMFusion,
    "gated": GatedFusion,
}


# ----------------------------------------------------------------------------------------------
# cross-modal interaction between encoder stages (Table 3): CentralNet and MMTM
#
# Both walk the stages of all encoders in lock-step and meet at "levels", each one just after a given stage (a
# tap) of every encoder. ResNet-18 has more stages than the MLP of a vector view, so encoders of different depths
# meet at their deepest taps and a model has as many levels as its shallowest encoder has taps: a ResNet with an
# MLP meets after (layer3, layer1) and (layer4, layer2) for both designs.

# fusion -> encoder class -> the stages a level follows, shallow to deep
MIXING_TAPS = {
    # CentralNet fuses at every hidden layer: the four residual stages of ResNet-18, the MLP's hidden layers
    "centralnet": {ResNetEncoder: ("layer1", "layer2", "layer3", "layer4"), MLPEncoder: ("layer1", "layer2")},
    # MMTM after the last three residual stages, which carry mid- and high-level evidence a modality can share;
    # the stem and layer1 hold low-level, modality-specific filters
    "mmtm": {ResNetEncoder: ("layer2", "layer3", "layer4"), MLPEncoder: ("layer1", "layer2")},
}


def split_stages(encoder, taps):
    """The names of the encoder's stages cut after each tap: one list per tap (the stages up to and including it),
    then the tail after the last tap (["pool"] for a ResNet, [] for the MLP)."""
    groups, group = [], []
    for name, _ in encoder.stages.named_children():
        group.append(name)
        if name in taps:
            groups.append(group)
            group = []
    return groups + [group]


def stage_channels(stage):
    """The channels of a stage's output: every ResNet and MLP stage ends its computation with a BatchNorm of that
    width (a residual block's bn2, the stem's bn1, the MLP layer's BatchNorm1d)."""
    return [m for m in stage.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)][-1].num_features


def global_pool(h, frames):
    """A stage output pooled over space and, for video, time: [B*T, C, H, W] -> [B, C]; a vector stream [B, C] as
    is (frames = 1). to_frames folds clip b's frames into rows b*T .. b*T + T - 1."""
    if h.dim() == 4:
        h = h.mean(dim=(2, 3))  # [B*T, C]
    return h.view(-1, frames, h.shape[1]).mean(dim=1)


def scale_channels(h, gate, frames):
    """h [B*T, C, H, W] or [B, C] times gate [B, C], one gate per sample for all its frames and positions."""
    gate = gate.repeat_interleave(frames, dim=0)  # [B*T, C]
    return h * gate.view(*gate.shape, *[1] * (h.dim() - 2))


class MMTM(nn.Module):
    """The multimodal transfer module (Joze et al. 2020, Sec. 3.1) over n streams of C_i channels.

    Squeeze: S_i = stream i averaged over space and time [B, C_i]. Joint: Z = ReLU(W [S_1, ..., S_n] + b), of
    width 2 * sum C_i / ratio (the original's C_Z, ratio 4). Excitation: E_i = W_i Z + b_i, and stream i is
    rescaled channel-wise by 2 * sigmoid(E_i), a gate in (0, 2) (1 where E_i = 0).

    A missing modality (zeroed input) still has a stream: the encoder's answer to zeros, whose squeeze enters Z
    like any other, so the present modalities are gated as the module learned to gate them next to a blank
    modality, and the blank stream is gated by the present ones. With only modality i kept, every stream, and so
    the prediction, is a function of x^i alone: H(x^i) in the paper's sense."""

    def __init__(self, channels, ratio=4):
        super().__init__()
        joint = 2 * sum(channels) // ratio
        self.joint = nn.Linear(sum(channels), joint)
        self.excitations = nn.ModuleList(nn.Linear(joint, c) for c in channels)

    def forward(self, streams, frames):
        squeezed = torch.cat([global_pool(h, t) for h, t in zip(streams, frames)], dim=1)  # [B, sum C_i]
        joint = torch.relu(self.joint(squeezed))  # [B, C_Z]
        return [scale_channels(h, 2 * torch.sigmoid(excitation(joint)), t)
                for excitation, h, t in zip(self.excitations, streams, frames)]


class CentralNetLevel(nn.Module):
    """One layer of CentralNet's central branch (Vielzeuf et al. 2018, Sec. 3): the central input is a learned
    weighted sum of the branch's previous state and of the modality streams' hidden representations,

        z = alpha_C * c + sum_i alpha_i * P_i(S_i),    c <- ReLU(BN(Linear(z))),

    with S_i stream i averaged over space and time [B, C_i] and P_i a Linear projection to the central width
    (streams of ResNet stages and MLP layers differ in shape and width; pooling and projecting lets image, video
    and vector streams meet). The weights alpha start at 1; the first level has no previous state c.

    A missing modality (zeroed input) adds its encoder's answer to zeros, P_j(S_j(0)) weighted by alpha_j, at
    every level: a constant per coalition in eval mode."""

    def __init__(self, channels, width, first):
        super().__init__()
        self.first = first
        self.projections = nn.ModuleList(nn.Linear(c, width) for c in channels)
        self.weights = nn.Parameter(torch.ones(len(channels) + (0 if first else 1)))  # alpha_1..alpha_n[, alpha_C]
        self.layer = nn.Sequential(nn.Linear(width, width), BatchNorm1d(width), nn.ReLU(inplace=True))

    def forward(self, central, streams, frames):
        z = sum(self.weights[i] * projection(global_pool(h, t))
                for i, (projection, h, t) in enumerate(zip(self.projections, streams, frames)))  # [B, width]
        if not self.first:
            z = z + self.weights[-1] * central
        return self.layer(z)


def run_stages(encoder, names, x):
    """x through the named stages of the encoder, in order."""
    for name in names:
        x = encoder.stages.get_submodule(name)(x)
    return x


# ----------------------------------------------------------------------------------------------
# the multimodal classifier H(.) with modality masks: a shared base and the two kinds of fusion


def zero_absent(inputs, present):
    """The inputs with modality i's rows zeroed where present [B, n] is False."""
    return [x.masked_fill(~present[:, i].view(-1, *[1] * (x.dim() - 1)), 0) for i, x in enumerate(inputs)]


class MultimodalClassifier(nn.Module):
    """What every kind of classifier shares: the masking, and the checks of inputs and masks. A kind adds its
    encoders (self.encoders, one per modality), its fusion, forward(inputs, mask) -> logits [B, K], and
    coalition_predictor(inputs).

    input_specs: one (kind, channels) per modality, kind in KINDS. inputs: one tensor per modality, image
    [B, C, H, W], video [B, C, T, H, W], vector [B, D]. mask: BoolTensor [B, n], True = modality present.
    mask_mode: one of the kind's MASKS; None takes its default, the first."""

    MASKS = ()  # the maskings a kind allows, its default first: the one place that decides them

    def __init__(self, input_specs, num_classes, fusion, mask_mode=None, pretrained=False):
        super().__init__()
        mask_mode = self.MASKS[0] if mask_mode is None else mask_mode
        if mask_mode not in self.MASKS:
            raise ValueError(f"mask_mode {mask_mode!r} is not defined for fusion {fusion!r}; use "
                             f"{' or '.join(repr(mode) for mode in self.MASKS)}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        input_specs = [tuple(spec) for spec in input_specs]
        if not input_specs or any(len(spec) != 2 for spec in input_specs):
            raise ValueError(f"input_specs must be a non-empty list of (kind, channels) pairs, got {input_specs!r}")
        self.input_specs = input_specs
        self.num_modalities = len(input_specs)
        self.num_classes = num_classes
        self.fusion = fusion
        self.mask_mode = mask_mode

    def check_inputs(self, inputs):
        """Raise a ValueError unless `inputs` holds one tensor per modality, shaped as its spec says."""
        if not isinstance(inputs, (list, tuple)) or len(inputs) != self.num_modalities:
            got = f"{len(inputs)} inputs" if isinstance(inputs, (list, tuple)) else type(inputs).__name__
            raise ValueError(f"inputs: expected a list of {self.num_modalities} tensors (one per modality), got {got}")
        for i, (x, (kind, channels)) in enumerate(zip(inputs, self.input_specs)):
            dims = {"image": 4, "video": 5, "vector": 2}[kind]
            if not torch.is_tensor(x) or x.dim() != dims or x.shape[1] != channels:
                shape = list(x.shape) if torch.is_tensor(x) else type(x).__name__
                raise ValueError(f"inputs[{i}]: a {kind!r} modality with {channels} channels expects a {dims}-d "
                                 f"tensor with {channels} at dim 1, got {shape}")
            if x.shape[0] != inputs[0].shape[0]:
                raise ValueError(f"inputs[{i}] has batch size {x.shape[0]}, inputs[0] has {inputs[0].shape[0]}")

    def check_mask(self, mask, batch, device):
        """The mask, a BoolTensor [B, n] (all True when None), moved to `device`."""
        if mask is None:
            return torch.ones(batch, self.num_modalities, dtype=torch.bool, device=device)
        if not torch.is_tensor(mask) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, self.num_modalities):
            got = f"{mask.dtype} {list(mask.shape)}" if torch.is_tensor(mask) else type(mask).__name__
            raise ValueError(f"mask: expected a BoolTensor [{batch}, {self.num_modalities}] (True = modality "
                             f"present), got {got}")
        return mask.to(device)


class LateFusionClassifier(MultimodalClassifier):
    """Late fusion (FUSION_HEADS): each modality is encoded on its own to pooled features (encode), and the fusion
    head maps them to logits (fuse). A coalition needs only the head: the batch is encoded once for all of them."""

    # zeroing an absent modality's pooled feature (the authors' choice) is exact and cheap for late fusion; zeroing
    # its input (the paper's definition) is offered too
    MASKS = ("feature", "input")

    def __init__(self, input_specs, num_classes, fusion, mask_mode=None, pretrained=False):
        if fusion not in FUSION_HEADS:
            raise ValueError(f"fusion {fusion!r} is not a late fusion; expected one of {tuple(FUSION_HEADS)}")
        super().__init__(input_specs, num_classes, fusion, mask_mode, pretrained)
        self.encoders = build_encoders(self.input_specs, pretrained)
        self.head = FUSION_HEADS[fusion]([encoder.out_dim for encoder in self.encoders], num_classes)

    def absent_feature(self, i, x):
        """What the head sees for modality i where it is absent, [d_i]: zeros in feature mode; in input mode, the
        encoder's answer to one all-zero sample shaped like x's rows (exact in eval mode, where the encoder maps
        every all-zero input to this one feature)."""
        if self.mask_mode == "feature":
            return x.new_zeros(self.encoders[i].out_dim)
        return self.encoders[i](torch.zeros_like(x[:1]))[0]

    def absent_features(self, inputs, absent_cache=None):
        """absent_feature for every modality, one [d_i] each. absent_cache: a dict the caller keeps for one pass
        over a data set with fixed weights, in eval mode; the absent features, which then depend only on the
        weights and the shape of a sample, are computed once per sample shape instead of once per batch (in input
        mode, one single-sample encoder call per modality, which costs a ResNet on a CPU about a tenth of a batch
        of 64)."""
        shape = tuple(tuple(x.shape[1:]) for x in inputs)
        absent = None if absent_cache is None else absent_cache.get(shape)
        if absent is None:
            absent = [self.absent_feature(i, x) for i, x in enumerate(inputs)]
            if absent_cache is not None:
                absent_cache[shape] = absent
        return absent

    def encode(self, inputs, present=None):
        """Pooled features, one [B, d_i] per modality, with absent rows replaced as mask_mode says.

        Encoder i runs only on the rows that keep modality i, and not at all when no row does; in input mode in
        training, it instead runs on the whole batch with the absent rows' input zeroed, which is exact for
        BatchNorm's batch statistics. So in feature mode an encoder's BatchNorm statistics in training come only
        from the samples in which its modality is present: uni-modal copies of other modalities do not dilute
        them with zeros, and a uni-modal copy costs about one encoder. A modality present in a single row of a
        training batch is normalised as BatchNorm1d and BatchNorm2d say for a single sample."""
        self.check_inputs(inputs)
        batch = inputs[0].shape[0]
        present = self.check_mask(present, batch, inputs[0].device)
        if self.mask_mode == "input" and self.training:
            return [encoder(x) for encoder, x in zip(self.encoders, zero_absent(inputs, present))]
        features = []
        for i, (encoder, x) in enumerate(zip(self.encoders, inputs)):
            keep = present[:, i]  # [B]
            if keep.all():
                features.append(encoder(x))
                continue
            fill = self.absent_feature(i, x)  # [d_i]
            rows = keep.nonzero().squeeze(1)  # [B_i]
            if len(rows) == 0:
                features.append(fill.expand(batch, -1))
            else:
                kept = encoder(x[rows])  # [B_i, d_i]
                features.append(fill.to(kept.dtype).expand(batch, -1).index_copy(0, rows, kept))
        return features

    def fuse(self, features, mask=None, absent=None):
        """Logits [B, K] from the pooled features, one [B, d_i] per modality.

        Where mask [B, n] is False, modality i's row is first replaced by absent[i] ([d_i]; zeros when absent is
        None). Features from encode(inputs, mask) need no mask: encode has already removed the absent modalities."""
        if len(features) != self.num_modalities:
            raise ValueError(f"features: expected {self.num_modalities} tensors, got {len(features)}")
        if mask is not None:
            mask = self.check_mask(mask, features[0].shape[0], features[0].device)
            if absent is None:
                absent = [feature.new_zeros(feature.shape[1]) for feature in features]
            features = [torch.where(mask[:, i, None], feature, fill.to(feature.dtype))
                        for i, (feature, fill) in enumerate(zip(features, absent))]
        return self.head(features)

    def forward(self, inputs, mask=None):
        return self.fuse(self.encode(inputs, mask))

    def coalition_predictor(self, inputs, absent_cache=None):
        """predict(mask) -> logits [B, K] for the coalitions in mask [B, n] (what shapley_mm.valuate calls), equal
        to forward(inputs, mask).

        In eval mode the batch is encoded once with every modality present; each call then only swaps in the
        absent features (absent_features, with absent_cache) and runs the fusion head. In training mode, where
        BatchNorm's batch statistics depend on which rows are present, each call is a forward of the whole batch."""
        if self.training:
            return lambda mask: self(inputs, mask)
        features = self.encode(inputs)
        absent = self.absent_features(inputs, absent_cache)
        return lambda mask: self.fuse(features, mask, absent)


class InteractionClassifier(MultimodalClassifier):
    """The fusions that mix the modalities inside the network: CentralNet and MMTM (StageMixingClassifier) and MBT
    (BottleneckClassifier). A modality is removed at its input, and every coalition needs the whole network. A
    subclass builds its network and defines interact(inputs, present) -> logits [B, K]."""

    # the modalities mix inside the network, where a modality has no feature of its own to zero: removing it means
    # removing its input (the paper's definition)
    MASKS = ("input",)

    def interact(self, inputs, present):
        raise NotImplementedError(f"{type(self).__name__} defines no interact(inputs, present)")

    def forward(self, inputs, mask=None):
        # an absent modality's input is zeroed and the whole batch runs through the network
        self.check_inputs(inputs)
        present = self.check_mask(mask, inputs[0].shape[0], inputs[0].device)
        return self.interact(zero_absent(inputs, present), present)

    def coalition_predictor(self, inputs, absent_cache=None):
        """predict(mask) -> logits [B, K] for the coalitions in mask [B, n] (what shapley_mm.valuate calls): each
        call is forward(inputs, mask), one batched run of the whole network. absent_cache is accepted for the
        callers' sake and not used: no part of the network is shared between coalitions."""
        return lambda mask: self(inputs, mask)


class StageMixingClassifier(InteractionClassifier):
    """CentralNet and MMTM (MIXING_TAPS): the encoders' stages are walked in lock-step with `mixers` between them
    (interact). MMTM rescales the streams and a Concatenation head reads their pooled features, as in the paper's
    Concatenation baseline; CentralNet's central branch (one CentralNetLevel per level) gives the prediction."""

    def __init__(self, input_specs, num_classes, fusion, mask_mode=None, pretrained=False):
        if fusion not in MIXING_TAPS:
            raise ValueError(f"fusion {fusion!r} is not a stage-mixing fusion; expected one of {tuple(MIXING_TAPS)}")
        super().__init__(input_specs, num_classes, fusion, mask_mode, pretrained)
        self.encoders = build_encoders(self.input_specs, pretrained)
        # the levels: every encoder's last `levels` taps, so that the deepest features of all encoders meet
        taps = [MIXING_TAPS[fusion][type(encoder)] for encoder in self.encoders]
        levels = min(len(encoder_taps) for encoder_taps in taps)
        # per encoder: the stage names of each level, then the tail after the last level
        self.stage_groups = [split_stages(encoder, encoder_taps[-levels:])
                             for encoder, encoder_taps in zip(self.encoders, taps)]
        channels = [[stage_channels(encoder.stages.get_submodule(groups[level][-1]))
                     for encoder, groups in zip(self.encoders, self.stage_groups)]
                    for level in range(levels)]  # [levels][n]
        feature_dims = [encoder.out_dim for encoder in self.encoders]
        if fusion == "mmtm":
            self.mixers = nn.ModuleList(MMTM(level_channels) for level_channels in channels)
            self.head = ConcatFusion(feature_dims, num_classes)
        else:  # centralnet: one central width, the widest stream at any level
            width = max(max(level_channels) for level_channels in channels)
            self.mixers = nn.ModuleList(CentralNetLevel(level_channels, width, first=(level == 0))
                                        for level, level_channels in enumerate(channels))
            self.head = nn.Linear(width, num_classes)  # the central branch's classifier

    def interact(self, inputs, present):
        """Logits [B, K] for inputs in which the absent modalities are already zeroed (present [B, n] is not read:
        zeroing the input is all the removal CentralNet and MMTM need).

        The encoders' stages are walked in lock-step, level by level (stage_groups); after each level, MMTM
        rescales every stream, and CentralNet's central branch takes its next step from its state and the streams.
        Video clips run as frames ([B*T, C, H, W], to_frames) and are pooled over T by the mixers and at the end."""
        streams, frames = [], []
        for encoder, x in zip(self.encoders, inputs):
            x, num_frames = encoder.to_frames(x)
            streams.append(x)
            frames.append(num_frames)
        central = None  # CentralNet's central state [B, width]
        for level, mixer in enumerate(self.mixers):
            streams = [run_stages(encoder, groups[level], h)
                       for encoder, groups, h in zip(self.encoders, self.stage_groups, streams)]
            if self.fusion == "mmtm":
                streams = mixer(streams, frames)
            else:
                central = mixer(central, streams, frames)
        if self.fusion == "centralnet":
            return self.head(central)
        features = [encoder.from_frames(run_stages(encoder, groups[-1], h), num_frames)
                    for encoder, groups, h, num_frames in zip(self.encoders, self.stage_groups, streams, frames)]
        return self.head(features)  # [B, K]


# ----------------------------------------------------------------------------------------------
# MBT: the multimodal bottleneck transformer (Nagrani et al., NeurIPS 2021), trained from scratch (Table 3)
#
# Each modality is cut into tokens with a class token in front and runs through its own stack of ViT encoder
# layers (torchvision's EncoderBlock). Layers before `fusion_layer` see one modality's tokens alone; from it on,
# each modality's layer attends to its tokens plus B shared bottleneck tokens, and the bottleneck tokens that the
# modalities' layers return are averaged into the next layer's (as the official JAX code, google-research/scenic,
# projects/mbt, does it). The final class token of every modality, LayerNorm'd, goes through one linear classifier,
# and the logits are averaged over the modalities (scenic's "token" classifier).
#
# Removing a modality means its input is absent, not zeroed: its bottleneck tokens are left out of the average
# (which runs over the present modalities only), and its class token out of the logits' average, so it acts as if
# it had no tokens. An absent modality, its input and its weights cannot change the output (a row with no modality
# at all gets the classifier's bias).
#
# Differences from scenic's MBT: positional embeddings are learned per axis (rows,
# columns, frames), so that one model takes any input size the data sets give; a vector view is cut into groups of
# VECTOR_PATCH features; the averaged logits are trained (scenic trains each modality's class token with its own
# cross-entropy and averages only at test time); the classifier starts from torch's default initialisation, not
# zeros; no dropout or stochastic depth. There is no modality embedding: a modality's tokens share a sequence only
# with the bottleneck tokens, and one vector added to all of them would be the bias of its own patch embedding.

# sizes a CPU trains in the tests and on mfeat; MBT_PAPER: ViT-Base, fusion at layer 8, 4 bottleneck tokens,
# 16 x 16 patches (scenic's MBT configuration), for GPUs. The MLP of a layer is 4 * width wide (3072 for ViT-Base).
MBT_DEFAULTS = dict(layers=4, width=64, heads=4, fusion_layer=2, bottlenecks=4, patch=16)
MBT_PAPER = dict(layers=12, width=768, heads=12, fusion_layer=8, bottlenecks=4, patch=16)
VECTOR_PATCH = 8  # features of a vector view per token
MAX_POSITIONS = 256  # the patches per image axis, and the frames per clip, that positional embeddings cover


def check_mbt(layers, width, heads, fusion_layer, bottlenecks, patch, pretrained=False, name=str):
    """Raise a ValueError, naming the setting as name(key) does (train.py: its flag), unless MBT's sizes make a
    model."""
    for key, value, low in (("layers", layers, 1), ("width", width, 1), ("heads", heads, 1),
                            ("fusion_layer", fusion_layer, 0), ("bottlenecks", bottlenecks, 1), ("patch", patch, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"MBT {name(key)} must be an integer >= {low}, got {value!r}")
    if width % heads:
        raise ValueError(f"MBT {name('width')} {width} must be a multiple of {name('heads')} {heads}")
    if fusion_layer > layers:
        raise ValueError(f"MBT {name('fusion_layer')} {fusion_layer} must be at most {name('layers')} {layers} "
                         f"(which fuses nothing before the class tokens)")
    if pretrained:
        raise ValueError(f"{name('pretrained')}: MBT is trained from scratch (as in the paper); there are no "
                         f"pretrained weights for it")


def check_positions(frames, rows, columns):
    """Raise a ValueError unless positional embeddings cover `frames` frames of rows x columns patches."""
    if max(rows, columns, frames) > MAX_POSITIONS:
        raise ValueError(f"MBT: {frames} frames of {rows} x {columns} patches; positional embeddings cover at most "
                         f"{MAX_POSITIONS} per axis (use a larger patch)")


def check_mbt_input(kind, shape, patch):
    """Raise a ValueError unless MBT's tokens of one input of `kind` and `shape` (without the batch axis: [C, H, W]
    for an image, [C, T, H, W] for a clip) fit its positional embeddings."""
    if kind != "vector":
        frames = shape[1] if kind == "video" else 1
        check_positions(frames, -(-shape[-2] // patch), -(-shape[-1] // patch))


def positions(count, width):
    """A learned positional embedding [count, width], initialised as BERT's (and scenic's): N(0, 0.02)."""
    return nn.Parameter(torch.empty(count, width).normal_(std=0.02))


class PatchTokens(nn.Module):
    """An image [B, C, H, W] (a spectrogram is one, C = 1) or a clip [B, C, T, H, W] -> tokens [B, T*h*w, width]:
    every frame is zero-padded at the bottom and right to a multiple of `patch` and cut into patch x patch patches,
    each linearly embedded (a strided convolution), plus a learned embedding of its row, of its column and, for a
    clip, of its frame."""

    def __init__(self, channels, width, patch, video):
        super().__init__()
        self.patch, self.video = patch, video
        self.embed = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)
        nn.init.trunc_normal_(self.embed.weight, std=(1 / (channels * patch * patch)) ** 0.5)  # as torchvision's ViT
        nn.init.zeros_(self.embed.bias)
        self.rows, self.columns = positions(MAX_POSITIONS, width), positions(MAX_POSITIONS, width)
        self.times = positions(MAX_POSITIONS, width) if video else None

    def forward(self, x):
        frames = x.shape[2] if self.video else 1
        if self.video:
            x = x.transpose(1, 2).flatten(0, 1)  # [B*T, C, H, W]
        x = F.pad(x, (0, -x.shape[3] % self.patch, 0, -x.shape[2] % self.patch))
        x = self.embed(x)  # [B*T, width, h, w]
        h, w = x.shape[2:]
        check_positions(frames, h, w)
        x = x.flatten(2).transpose(1, 2) + (self.rows[:h, None] + self.columns[None, :w]).flatten(0, 1)
        x = x.view(-1, frames, h * w, x.shape[-1])  # [B, T, h*w, width]
        if self.video:
            x = x + self.times[:frames, None]
        return x.flatten(1, 2)


class VectorTokens(nn.Module):
    """A vector view [B, D] -> tokens [B, ceil(D / VECTOR_PATCH), width]: consecutive groups of VECTOR_PATCH
    features (the last one zero-padded), each embedded by its own linear map. The features of a vector view (Fourier
    coefficients, Zernike moments, profile correlations) have no translation invariance for one shared kernel to
    use, so each group has its own, and its own bias is its positional embedding."""

    def __init__(self, features, width, patch=VECTOR_PATCH):
        super().__init__()
        self.features, self.patch = features, patch
        tokens = -(-features // patch)
        bound = patch ** -0.5  # nn.Linear's initialisation for each group
        self.weight = nn.Parameter(torch.empty(tokens, patch, width).uniform_(-bound, bound))
        self.bias = positions(tokens, width)

    def forward(self, x):
        x = F.pad(x, (0, len(self.bias) * self.patch - self.features)).view(len(x), len(self.bias), self.patch)
        return torch.einsum("btp,tpd->btd", x, self.weight) + self.bias  # [B, tokens, width]


class ModalityTransformer(nn.Module):
    """One modality's part of MBT: its tokeniser, its class token and its own ViT encoder layers, one for each
    layer of the model (embed(x) -> [B, 1 + N, width], the class token first)."""

    def __init__(self, kind, channels, layers, width, heads, patch):
        super().__init__()
        self.tokens = VectorTokens(channels, width) if kind == "vector" else \
            PatchTokens(channels, width, patch, video=(kind == "video"))
        self.cls = nn.Parameter(torch.zeros(1, 1, width))  # zeros, as scenic's class token
        self.layers = nn.ModuleList(EncoderBlock(heads, width, 4 * width, dropout=0.0, attention_dropout=0.0)
                                    for _ in range(layers))
        self.out_dim = width

    def embed(self, x):
        tokens = self.tokens(x)
        return torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1)


class BottleneckClassifier(InteractionClassifier):
    """MBT (fusion "mbt"): one ModalityTransformer per modality (encoders), fused through bottleneck tokens from
    layer `fusion_layer` on (interact). Sizes: MBT_DEFAULTS, MBT_PAPER; fusion_layer = layers fuses nothing before
    the classifier, 0 fuses from the first layer."""

    def __init__(self, input_specs, num_classes, fusion="mbt", mask_mode=None, pretrained=False, **sizes):
        if fusion != "mbt":
            raise ValueError(f"fusion {fusion!r} is not MBT; BottleneckClassifier builds fusion 'mbt'")
        unknown = set(sizes) - set(MBT_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown MBT settings {sorted(unknown)}; expected some of {list(MBT_DEFAULTS)}")
        sizes = dict(MBT_DEFAULTS, **sizes)
        check_mbt(**sizes, pretrained=pretrained)
        super().__init__(input_specs, num_classes, fusion, mask_mode, pretrained)
        self.sizes, self.fusion_layer = sizes, sizes["fusion_layer"]
        width = sizes["width"]
        self.encoders = nn.ModuleList(ModalityTransformer(kind, channels, sizes["layers"], width, sizes["heads"],
                                                          sizes["patch"]) for kind, channels in self.input_specs)
        self.bottleneck = nn.Parameter(torch.empty(1, sizes["bottlenecks"], width).normal_(std=0.02))  # as scenic
        self.norm = nn.LayerNorm(width, eps=1e-6)  # the encoder's final norm, shared by the modalities
        self.head = nn.Linear(width, num_classes)  # one classifier for every modality's class token

    def interact(self, inputs, present):
        """Logits [B, K]; present [B, n] says which modalities each row has (the absent ones' inputs are zeroed,
        and their tokens, run along with the batch, are given weight 0 in both averages)."""
        weights = present.to(self.bottleneck.dtype)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1)  # [B, n]: mean over present modalities
        tokens = [encoder.embed(x) for encoder, x in zip(self.encoders, inputs)]  # [B, 1 + N_i, width] each
        bottleneck = self.bottleneck.expand(len(weights), -1, -1)  # [B, bottlenecks, width]
        for layer in range(len(self.encoders[0].layers)):
            if layer < self.fusion_layer:  # each modality on its own
                tokens = [encoder.layers[layer](h) for encoder, h in zip(self.encoders, tokens)]
                continue
            # each modality attends to its tokens and the bottleneck tokens; the bottlenecks are averaged after
            outputs = [encoder.layers[layer](torch.cat([h, bottleneck], dim=1))
                       for encoder, h in zip(self.encoders, tokens)]
            tokens = [out[:, :h.shape[1]] for out, h in zip(outputs, tokens)]
            bottleneck = sum(weights[:, i, None, None] * out[:, h.shape[1]:]
                             for i, (out, h) in enumerate(zip(outputs, tokens)))
        cls = torch.stack([self.norm(h[:, 0]) for h in tokens], dim=1)  # [B, n, width]
        return self.head((weights[:, :, None] * cls).sum(dim=1))  # the mean of the present modalities' logits


# fusion -> the kind of classifier that builds it, in the order of Tables 1 and 3
CLASSIFIERS = {**dict.fromkeys(FUSION_HEADS, LateFusionClassifier), **dict.fromkeys(MIXING_TAPS, StageMixingClassifier),
               "mbt": BottleneckClassifier}
FUSIONS = tuple(CLASSIFIERS)


def classifier_kind(fusion):
    """The classifier class of a fusion; a ValueError for an unknown one."""
    if fusion not in CLASSIFIERS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    return CLASSIFIERS[fusion]


def allowed_masks(fusion):
    """The maskings a fusion allows, its default first (its kind's MASKS)."""
    return classifier_kind(fusion).MASKS


def build_model(input_specs, num_classes, fusion="concat", mask_mode=None, pretrained=False, mbt=None):
    """The classifier of a fusion: a LateFusionClassifier, a StageMixingClassifier or a BottleneckClassifier.
    mask_mode None takes the fusion's default, allowed_masks(fusion)[0]; a mask_mode the fusion does not allow is a
    ValueError. mbt: MBT's sizes (some of MBT_DEFAULTS' keys; the others from MBT_DEFAULTS), for fusion "mbt" only."""
    kind = classifier_kind(fusion)
    if kind is BottleneckClassifier:
        return kind(input_specs, num_classes, fusion, mask_mode, pretrained, **(mbt or {}))
    if mbt is not None:
        raise ValueError(f"mbt sizes apply to fusion 'mbt' only, not {fusion!r}")
    return kind(input_specs, num_classes, fusion, mask_mode, pretrained)

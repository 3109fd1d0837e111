"""Encoders, fusion heads and the maskable multimodal classifier H(.) of the paper (Sec. 3.1).

Each modality has its own encoder (ResNet-18 for images, spectrograms, RGB and optical-flow clips; a small MLP for
vector views) that pools its input to one feature vector; a fusion head maps the list of pooled features to logits.
The classifier takes a BoolTensor mask [B, n] of the modalities each row keeps, which is how the paper builds the
prediction from a coalition C of modalities (Eq. 1) and the uni-modal copies of re-sampling (Alg. 1 and 2):

  mask_mode "feature" (the authors' code, the default): an absent modality's pooled feature is zeroed before the head.
  mask_mode "input"   (the paper's text): an absent modality's input is zeroed before its encoder.

coalition_predictor() encodes a batch once and then runs only the fusion head per coalition, so valuing all
2^n - 1 coalitions of a batch costs about one forward pass.
"""

from collections import OrderedDict

import torch
import torch.nn as nn
import torchvision

KINDS = ("image", "video", "vector")
MASK_MODES = ("feature", "input")


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


def load_imagenet_resnet18_state():
    """The state dict of torchvision's ImageNet ResNet-18 (ResNet18_Weights.IMAGENET1K_V1), read from the torch hub
    cache or downloaded into it; a RuntimeError says where to put the file when it can be neither."""
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    file_name = url.rsplit("/", 1)[-1]
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True)
    except Exception as error:  # no network, a failed download, or a corrupt cached file
        cache_path = f"{torch.hub.get_dir()}/checkpoints/{file_name}"
        raise RuntimeError(
            f"pretrained=True: could not load the ImageNet ResNet-18 weights ({error}). Without network access, "
            f"download {url} on another machine and place it at {cache_path} (torch hub's cache; set TORCH_HOME to "
            f"move it), or train with pretrained=False") from error


class ResNetEncoder(nn.Module):
    """torchvision's ResNet-18 without its classifier: [B, C, H, W] -> [B, 512].

    Video clips [B, C, T, H, W] fold T into the batch, and the pooled features of the T frames are averaged (as the
    authors' code does for its three visual frames). The stages (stem, layer1..layer4, pool) are the children of
    `self.stages`, so cross-modal modules can be placed between them."""

    def __init__(self, channels, video=False, pretrained=False):
        super().__init__()
        net = torchvision.models.resnet18(weights=None)
        if channels != 3:
            net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if pretrained:
            state = load_imagenet_resnet18_state()
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
            layers[f"layer{index}"] = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))
            dim = hidden
        self.stages = nn.Sequential(layers)
        self.out_dim = dim

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
    OGM-GE's x_film=True (modality 1, e.g. audio, modulates modality 2). An absent conditioning modality (zero
    feature in feature mode) applies the fixed learned modulation (gamma, beta) = its layer's bias; an absent
    modulated modality leaves h = the projection's bias for the others to modulate."""

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


# fusion name -> head class, built as head(feature_dims, num_classes)
FUSION_HEADS = {
    "concat": ConcatFusion,
    "sum": SumFusion,
    "decision": DecisionFusion,
    "film": FiLMFusion,
    "gated": GatedFusion,
}
FUSIONS = tuple(FUSION_HEADS)

# the masking each fusion uses unless told otherwise: every head above fuses pooled features, so zeroing an
# absent modality's feature (the authors' choice) is exact and cheap for all of them
DEFAULT_MASK = {
    "concat": "feature",
    "sum": "feature",
    "decision": "feature",
    "film": "feature",
    "gated": "feature",
}


# ----------------------------------------------------------------------------------------------
# the multimodal classifier H(.) with modality masks


def run_encoder(encoder, x):
    """encoder(x), except that a training batch of a single row, which has no batch statistics, is normalised with
    BatchNorm's running statistics (and does not update them); gradients flow as usual. Re-sampled epochs make such
    rows possible: a shuffled batch can hold one sample that keeps a given modality."""
    if not (encoder.training and x.shape[0] == 1):
        return encoder(x)
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for norm in norms:
        norm.eval()
    try:
        return encoder(x)
    finally:
        for norm in norms:
            norm.train()


class MultimodalClassifier(nn.Module):
    """One encoder per modality and a fusion head; forward(inputs, mask) predicts from the modalities each row keeps.

    input_specs: one (kind, channels) per modality, kind in KINDS. inputs: one tensor per modality, image
    [B, C, H, W], video [B, C, T, H, W], vector [B, D]. mask: BoolTensor [B, n], True = modality present."""

    def __init__(self, input_specs, num_classes, fusion="concat", mask_mode="feature", pretrained=False):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"unknown mask_mode {mask_mode!r}; expected one of {MASK_MODES}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        input_specs = [tuple(spec) for spec in input_specs]
        if not input_specs or any(len(spec) != 2 for spec in input_specs):
            raise ValueError(f"input_specs must be a non-empty list of (kind, channels) pairs, got {input_specs!r}")
        if pretrained and all(kind == "vector" for kind, _ in input_specs):
            raise ValueError("pretrained=True needs an 'image' or 'video' modality; all of input_specs are vectors")
        self.input_specs = input_specs
        self.num_modalities = len(input_specs)
        self.num_classes = num_classes
        self.fusion = fusion
        self.mask_mode = mask_mode
        # True for fusions whose cross-modal modules sit between encoder stages (CentralNet, MMTM): a coalition
        # then needs the whole network, not just the head (see coalition_predictor)
        self.mixes_inside = False
        # pretrained applies to the ResNets; vector encoders start from scratch
        self.encoders = nn.ModuleList(build_encoder(kind, channels, pretrained and kind != "vector")
                                      for kind, channels in input_specs)
        self.head = FUSION_HEADS[fusion]([encoder.out_dim for encoder in self.encoders], num_classes)

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

    def absent_feature(self, i, x):
        """What the head sees for modality i where it is absent, [d_i]: zeros in feature mode; in input mode, the
        encoder's answer to one all-zero sample shaped like x's rows (exact in eval mode, where the encoder maps
        every all-zero input to this one feature)."""
        if self.mask_mode == "feature":
            return x.new_zeros(self.encoders[i].out_dim)
        return self.encoders[i](torch.zeros_like(x[:1]))[0]

    def encode(self, inputs, present=None):
        """Pooled features, one [B, d_i] per modality, with absent rows replaced as mask_mode says.

        Encoder i runs only on the rows that keep modality i, and not at all when no row does; in input mode in
        training, it instead runs on the whole batch with the absent rows' input zeroed, which is exact for
        BatchNorm's batch statistics. So in feature mode an encoder's BatchNorm statistics in training come only
        from the samples in which its modality is present: uni-modal copies of other modalities do not dilute
        them with zeros, and a uni-modal copy costs about one encoder. A modality present in a single row of a
        training batch is normalised with BatchNorm's running statistics (see run_encoder)."""
        self.check_inputs(inputs)
        batch = inputs[0].shape[0]
        present = self.check_mask(present, batch, inputs[0].device)
        features = []
        for i, (encoder, x) in enumerate(zip(self.encoders, inputs)):
            keep = present[:, i]  # [B]
            if keep.all():
                features.append(run_encoder(encoder, x))
            elif self.mask_mode == "input" and self.training:
                keep_x = keep.view(-1, *[1] * (x.dim() - 1))
                features.append(run_encoder(encoder, x.masked_fill(~keep_x, 0)))
            else:
                fill = self.absent_feature(i, x)  # [d_i]
                rows = keep.nonzero().squeeze(1)  # [B_i]
                if len(rows) == 0:
                    features.append(fill.expand(batch, -1))
                else:
                    kept = run_encoder(encoder, x[rows])  # [B_i, d_i]
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

    def coalition_predictor(self, inputs):
        """predict(mask) -> logits [B, K] for the coalitions in mask [B, n] (what shapley_mm.valuate calls).

        The batch is encoded once with every modality present; each call then only swaps in the absent features
        (zeros, or the constant zero-input feature in input mode) and runs the fusion head. Fusions that mix
        modalities inside the encoders, and a model in training mode (where BatchNorm's batch statistics depend on
        which rows are present), run the whole network per coalition instead. Either way predict(mask) equals
        forward(inputs, mask)."""
        if self.mixes_inside or self.training:
            return lambda mask: self(inputs, mask)
        features = self.encode(inputs)
        absent = [self.absent_feature(i, x) for i, x in enumerate(inputs)]
        return lambda mask: self.fuse(features, mask, absent)


def build_model(input_specs, num_classes, fusion="concat", mask_mode=None, pretrained=False):
    """A MultimodalClassifier; mask_mode None takes the fusion's default (DEFAULT_MASK)."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    mask_mode = DEFAULT_MASK[fusion] if mask_mode is None else mask_mode
    return MultimodalClassifier(input_specs, num_classes, fusion, mask_mode, pretrained)

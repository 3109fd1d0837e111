"""Sample-level modality valuation and the re-sampling rules built on it.

Implements Sections 3.2 and 3.4 of "Enhancing Multimodal Cooperation via Sample-level Modality
Valuation" (Wei, Feng, Wang, Hu, CVPR 2024) for any number n of modalities, with torch only.

- Eq. 1: the benefit of a coalition C of modalities for one sample is v(C) = |C| when the model,
  given only the modalities in C, predicts the label correctly, and 0 otherwise; v(empty) = 0.
- Eq. 2-3: the contribution phi^i of modality i is its exact Shapley value: its marginal
  contribution v(S u {i}) - v(S), with S its predecessors, averaged over all n! orders of the
  modalities. It is linear in the 2**n values of v, so a whole batch is one matrix product
  [B, 2**n] @ [2**n, n] on integer counts of orders (|S|! (n - |S| - 1)! for each coalition S,
  built in 2**n * n steps without walking the n! orders), divided by n! once, so every phi is the
  correctly rounded rational p / n! and the rules below decide exactly. The contributions add up
  to v(N): 0 or n. valuate's cost is its 2**n - 1 predictions: with a linear head over 64 samples
  on one CPU core, n = 11 takes about 0.2 s and n = 13 under a second.
- Eq. 10 (Algorithm 1): a sample whose modality i contributes phi^i < 1 gets s = f_s(1 - phi^i)
  extra copies in which only modality i is kept.
- Eq. 11 (Algorithm 2): on a random subset Z, the modality with the lowest mean contribution is
  re-sampled alone, for every training sample, with a probability that grows with its gap d to
  the others.

Coalitions are numbered by bits: coalition k holds modality i exactly when bit i of k is set.

Usage with your own model, masking a modality by zeroing its features before the fusion head:

    features = [encoder(x) for encoder, x in zip(encoders, inputs)]  # n tensors [B, D_i]
    def predict(mask):                                               # mask: [B, n] bool
        return head(torch.cat([f * mask[:, i:i + 1] for i, f in enumerate(features)], 1))
    with torch.no_grad():
        phi = shapley_mm.valuate(predict, labels, n=len(features))  # [B, n], Eq. 1-3
    copies = shapley_mm.sample_level_copies(phi)                     # [B, n], Eq. 10
    sample_index, modality = shapley_mm.expand_copies(copies)        # the uni-modal copies of D^rs

With your own evaluation loop, coalition_correctness(predict, labels, n) gives the step before
Eq. 1 (which coalitions predict each sample correctly, and the all-modality logits): accuracy,
per-modality accuracy and phi = shapley_values(benefit(correct)) then come from one pass.
"""

import functools
import math
from fractions import Fraction

import torch


def _num_modalities(width, name):
    """n such that width == 2**n (n >= 1), or a ValueError naming the argument."""
    if width < 2 or width & (width - 1):
        raise ValueError(f"{name} must have 2**n columns (one per coalition, n >= 1), got {width}")
    return width.bit_length() - 1


def coalitions(n):
    """All 2**n coalitions as a BoolTensor [2**n, n]: row k holds modality i iff bit i of k is set.

    Row 0 is the empty coalition, row 2**n - 1 is all modalities N."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of modalities) must be an integer >= 1, got {n!r}")
    rows = torch.arange(2 ** n)
    return ((rows[:, None] >> torch.arange(n)) & 1) == 1  # [2**n, n]


def benefit(correct):
    """Eq. 1: v(C) = |C| if the prediction from coalition C is correct, else 0; v(empty) = 0.

    correct: BoolTensor [B, 2**n], coalitions laid out as in coalitions(n).
    Returns FloatTensor [B, 2**n]."""
    if correct.dtype != torch.bool or correct.dim() != 2:
        raise ValueError(f"correct must be a BoolTensor [B, 2**n], got {correct.dtype} "
                         f"of shape {tuple(correct.shape)}")
    n = _num_modalities(correct.shape[-1], "correct")
    size = coalitions(n).sum(1).to(correct.device, torch.float32)  # [2**n] = |C|, 0 for the empty set
    return correct * size


@functools.lru_cache(maxsize=None)
def _shapley_counts(n):
    """Eq. 2-3 as an integer matrix W [2**n, n] (float64, CPU) with phi = (v @ W) / n!.

    Of the n! orders of Eq. 3, those in which modality i comes right after the modalities of S (i not in S)
    number |S|! (n - |S| - 1)!: each adds +1 on the coalition S u {i} and -1 on S (Eq. 2). So
    W[S u {i}, i] = |S|! (n - |S| - 1)! and W[S, i] = -|S|! (n - |S| - 1)!, integers (exact in float64 up to
    (n - 1)! = 18!, n = 19); the division by n! of Eq. 3 is left to the end. Cost 2**n * n, once per n."""
    members = coalitions(n)  # [2**n, n]
    size = members.sum(1, keepdim=True)  # [2**n, 1], |coalition|
    orders = [math.factorial(k) * math.factorial(n - k - 1) for k in range(n)]  # |S|! (n - |S| - 1)!, |S| < n
    orders = torch.tensor(orders + [0], dtype=torch.float64)  # |S| = n has no i outside it
    return torch.where(members, orders[(size - 1).clamp(min=0)], -orders[size])  # S u {i} = coalition, or S


def shapley_values(v):
    """Eq. 2-3, exact: the Shapley value phi [B, n] of every modality from a value table v [B, 2**n].

    v may hold any real values (not only Eq. 1 benefits), laid out as in coalitions(n); phi has
    v's dtype and device. One matrix product for the whole batch, in float64 on the integer
    counts of orders (_shapley_counts), then one division by n!. Under Eq. 1 every v(C) is an integer, so the
    product is an exact integer p and phi = p / n! is the correctly rounded value of that rational:
    a row whose coalitions are all correct gives exactly 1, and the thresholds of Eq. 10 and every
    comparison between contributions decide as exact arithmetic would (distinct contributions
    differ by at least 1 / n!, far above float32 resolution for n <= 8)."""
    if not v.is_floating_point():
        raise ValueError(f"v must be a floating-point tensor [B, 2**n], got {v.dtype}")
    n = _num_modalities(v.shape[-1], "v")
    counts = _shapley_counts(n).to(v.device)  # [2**n, n], n! * the weights of Eq. 3
    with torch.autocast(v.device.type, enabled=False):  # keep full precision under mixed precision
        numerators = v.double() @ counts  # [B, 2**n] @ [2**n, n] -> [B, n], n! * phi
    return (numerators / math.factorial(n)).to(v.dtype)


def coalition_correctness(predict, labels, n):
    """Which coalitions of modalities predict each sample of a batch correctly: y_hat_C = y (Sec. 3.2).

    predict(mask) -> logits [B, K], with mask a BoolTensor [B, n] saying which modalities are kept
    (the same coalition for every sample, on labels.device); it is called once for each of the
    2**n - 1 non-empty coalitions, the full coalition N last (the empty coalition is never
    predicted; Eq. 1 gives it the value 0). labels: LongTensor [B].
    Returns (correct, full_logits): correct a BoolTensor [B, 2**n], coalitions laid out as in
    coalitions(n), and the logits [B, K] of the prediction from all modalities, which evaluation
    needs anyway."""
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor [B], got shape {tuple(labels.shape)}")
    members = coalitions(n).to(labels.device)  # [2**n, n]
    batch_size = len(labels)
    correct = torch.zeros(batch_size, 2 ** n, dtype=torch.bool, device=labels.device)  # [B, 2**n]
    for k in range(1, 2 ** n):
        logits = predict(members[k].repeat(batch_size, 1))
        if logits.dim() != 2 or logits.shape[0] != batch_size:
            raise ValueError(f"predict(mask) must return logits [B={batch_size}, K], "
                             f"got shape {tuple(logits.shape)}")
        correct[:, k] = logits.argmax(1) == labels  # is y_hat_C = y
    return correct, logits


def valuate(predict, labels, n):
    """Sample-level modality valuation (Eq. 1-3) of one batch: phi, FloatTensor [B, n].

    predict and labels as in coalition_correctness, which this is followed by Eq. 1-3."""
    correct, _ = coalition_correctness(predict, labels, n)
    return shapley_values(benefit(correct))  # Eq. 1, then Eq. 2-3


def sample_level_copies(phi, f_s=None):
    """Eq. 10: s(x^i) = f_s(1 - phi^i) if phi^i < 1, else 0, as a LongTensor [B, n].

    s[k, i] is how many extra copies of sample k keep only modality i (Algorithm 1).

    The default f_s is the authors' rule, applied as thresholds on phi so that it is exact at the
    boundaries whatever n and the dtype (1 - 0.4 is not exactly 0.6 in floating point):
        1 copy  for  0.4 <= phi < 1      (f_s(x) = 1 for 0 < x <= 0.6)
        2 copies for -0.1 <= phi < 0.4   (f_s(x) = 2 for 0.6 < x <= 1.1)
        3 copies for phi < -0.1          (f_s(x) = 3 for x > 1.1)
    On the two-modality grid phi in {-0.5, 0, 0.5, 1, 1.5} this is f_s(x) = 2x, rounded. The
    authors' code uses open intervals (0.4 < phi < 1, -0.1 < phi < 0.4), so a contribution of
    exactly 0.4 or -0.1, possible from n = 5 on, gets no copy there; here it falls in the lower
    bracket, as the closed form f_s(x) = 2x suggests.

    Another monotonically increasing f_s can be passed: a callable mapping the tensor 1 - phi
    [B, n] to counts of the same shape; they are rounded and clamped to integers >= 0. Where phi < 1
    they must be finite and below 2**63 (a ValueError names the first sample and modality otherwise);
    -inf counts as 0, and where phi >= 1 what f_s returns is not used."""
    if not phi.is_floating_point() or phi.dim() != 2:
        raise ValueError(f"phi must be a floating-point tensor [B, n], got {phi.dtype} "
                         f"of shape {tuple(phi.shape)}")
    low = phi < 1  # the low-contributing modalities of each sample
    if f_s is None:
        return low.long() + (phi < 0.4).long() + (phi < -0.1).long()
    counts = torch.as_tensor(f_s(1 - phi), device=phi.device)
    if counts.shape != phi.shape:
        raise ValueError(f"f_s must return counts of the shape of phi {tuple(phi.shape)}, "
                         f"got {tuple(counts.shape)}")
    counts = torch.where(low, counts.to(phi.dtype).round().clamp(min=0), 0)  # NaN stays NaN
    unusable = ~(counts < 2 ** 63)  # NaN, inf, or more than a LongTensor holds
    if unusable.any():
        sample, modality = unusable.nonzero()[0].tolist()
        raise ValueError(f"f_s must return finite counts below 2**63, got {counts[sample, modality].item()} "
                         f"for sample {sample}, modality {modality} (1 - phi = {1 - phi[sample, modality].item()})")
    return counts.long()


F_M_CHOICES = ("linear", "tanh", "square")  # Eq. 11's f_m, the authors' three choices


def _exact_column_sums(phi):
    """The column sums of phi [Z, n] as exact Fractions, when every entry is a multiple of 1/n!.

    Eq. 1-3 contributions always are (shapley_values returns p / n!, correctly rounded), so the
    integer numerators p come back by rounding n! * phi and add up without error, however large Z
    is. Other tables (general real contributions) are summed in float64."""
    n = phi.shape[1]
    scale = math.factorial(n)
    scaled = phi.detach().cpu().double() * scale  # [Z, n], n! * phi
    numerators = scaled.round()
    if ((scaled - numerators).abs() <= 1e-6 * numerators.abs().clamp(min=1)).all():
        return [Fraction(int(total), scale) for total in numerators.long().sum(0).tolist()]
    return [Fraction(total) for total in scaled.sum(0).div(scale).tolist()]


def modality_level_plan(phi_subset, alpha=1.0, f_m="linear"):
    """Eq. 11: which modality to re-sample alone, and with what probability (Algorithm 2).

    phi_subset: [Z, n] contributions of the random subset Z. The overall low-contributing
    modality i is the argmin of the mean contribution (ties: lowest index). Its gap to the others is
        d = 1/(n-1) * sum_{j != i} (mean phi^j - mean phi^i)
    and Norm(d) is x = d * 2/3. For n = 2 this is exactly the authors' x = |gap_a - gap_v| * 2/3
    with gap_m = 1 - mean phi^m; the same factor is kept for n > 2. The authors' 2/3 takes 1.5,
    the top of the two-modality Eq. 1 grid {-0.5, 0, 0.5, 1, 1.5}, as the largest gap and maps it
    to 1. (Under Eq. 1 with two modalities phi^a - phi^v = v({a}) - v({v}) lies in [-1, 1], so in
    practice x <= 2/3.) Then p = f_m(x): "linear" alpha * x, "tanh" tanh(alpha * x), "square"
    alpha * x**1.5, clipped to [0, 1]. alpha must be a finite number >= 0 and the contributions finite
    (a ValueError says which otherwise).

    The means, the argmin and d are computed in exact rational arithmetic on Eq. 1 contributions
    (_exact_column_sums), so modalities with equal means tie exactly and a zero gap gives p = 0.

    Returns (modality: int, probability: float)."""
    if f_m not in F_M_CHOICES:
        raise ValueError(f"f_m must be one of {F_M_CHOICES}, got {f_m!r}")
    if not 0 <= alpha < math.inf:
        raise ValueError(f"alpha must be a finite number >= 0 (f_m increases, p stays defined), got {alpha}")
    if phi_subset.dim() != 2 or phi_subset.shape[0] < 1 or phi_subset.shape[1] < 2:
        raise ValueError(f"phi_subset must be [Z, n] with Z >= 1 samples and n >= 2 modalities, "
                         f"got shape {tuple(phi_subset.shape)}")
    not_finite = ~phi_subset.isfinite()  # NaN or +-inf
    if not_finite.any():
        row, modality = not_finite.nonzero()[0].tolist()
        raise ValueError(f"phi_subset must hold finite contributions, got {phi_subset[row, modality].item()} "
                         f"in row {row}, modality {modality}")
    subset_size, n = phi_subset.shape
    sums = _exact_column_sums(phi_subset)  # [n], Z * mean contribution
    modality = min(range(n), key=lambda i: (sums[i], i))
    gap = (sum(sums) - n * sums[modality]) / (subset_size * (n - 1))  # d of Eq. 11, >= 0
    x = float(gap) * 2 / 3  # Norm(d)
    if f_m == "linear":
        probability = alpha * x
    elif f_m == "tanh":
        probability = math.tanh(alpha * x)
    else:  # "square"
        probability = alpha * x ** 1.5
    return modality, min(max(probability, 0.0), 1.0)


def modality_level_copies(num_samples, num_modalities, modality, probability, generator=None):
    """Algorithm 2's re-sampled set as a copy table LongTensor [N, n].

    int(probability * num_samples) sample indices are drawn uniformly with replacement (as in the
    authors' code); column `modality` counts how often each sample was drawn, other columns are 0."""
    if num_samples < 1 or num_modalities < 1:
        raise ValueError(f"num_samples and num_modalities must be >= 1, "
                         f"got {num_samples} and {num_modalities}")
    if not 0 <= modality < num_modalities:
        raise ValueError(f"modality must be in [0, {num_modalities}), got {modality}")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    drawn = torch.randint(num_samples, (int(probability * num_samples),), generator=generator)
    copies = torch.zeros(num_samples, num_modalities, dtype=torch.long)
    copies[:, modality] = torch.bincount(drawn, minlength=num_samples)
    return copies


def _check_copies(copies):
    if copies.dim() != 2 or copies.dtype != torch.long or (copies < 0).any():
        raise ValueError(f"copies must be a LongTensor [B, n] of counts >= 0, got {copies.dtype} "
                         f"of shape {tuple(copies.shape)}")


def naive_copies(copies, generator=None):
    """Table 4 "naive re-sample": the same uni-modal copies per modality, on random samples.

    Each column of the copy table [B, n] is permuted independently (torch.randperm with the given
    CPU generator), so every modality keeps exactly its total number of copies."""
    _check_copies(copies)
    batch_size, n = copies.shape
    shuffled = torch.empty_like(copies)
    for i in range(n):
        order = torch.randperm(batch_size, generator=generator).to(copies.device)
        shuffled[:, i] = copies[order, i]
    return shuffled


def reversed_copies(phi, copies, generator=None):
    """Table 4 "reversed re-sample": every copy of a sample goes to its highest-contributing modality.

    phi: [B, n], copies: [B, n]. Each sample keeps its number of copies (row sum), all given to
    argmax phi. Ties (for example phi = (0, 0) when every coalition is wrong) are broken uniformly
    at random with the given CPU generator, so that no modality is favoured by its index."""
    _check_copies(copies)
    if phi.shape != copies.shape:
        raise ValueError(f"phi and copies must have the same shape [B, n], "
                         f"got {tuple(phi.shape)} and {tuple(copies.shape)}")
    tied = phi == phi.max(1, keepdim=True).values  # [B, n], the highest-contributing modalities
    draw = torch.rand(phi.shape, generator=generator).to(phi.device)  # [B, n], a random order among ties
    highest = torch.where(tied, draw, -1.0).argmax(1, keepdim=True).to(copies.device)  # [B, 1]
    return torch.zeros_like(copies).scatter_(1, highest, copies.sum(1, keepdim=True))


def expand_copies(copies):
    """Algorithms 1-2, "add x^i with frequency s(x^i) into D^rs": the copy table as a list of copies.

    copies: LongTensor [B, n]. Returns (sample_index [M], modality [M]) with M = copies.sum(),
    ordered by sample, then modality."""
    _check_copies(copies)
    n = copies.shape[1]
    cell = torch.arange(copies.numel(), device=copies.device).repeat_interleave(copies.reshape(-1))
    return cell // n, cell % n  # row-major cells: index = sample * n + modality

"""Tests of shapley_mm.py: the Shapley valuation (Eq. 1-3) and the re-sampling rules (Eq. 10-11,
Algorithms 1-2, the Table 4 ablations)."""

import itertools
import math
import re
from fractions import Fraction

import pytest
import torch

import shapley_mm


def random_table(n, batch_size=16, seed=0):
    """A random real-valued value table v [B, 2**n] (float64)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 2 ** n, generator=generator, dtype=torch.float64)


def bits(coalition):
    """The modalities in coalition number `coalition`, as a set."""
    return {i for i in range(coalition.bit_length()) if coalition >> i & 1}


# ----------------------------------------------------------------------------------------------
# Coalitions and Eq. 1


def test_coalitions_follow_the_bits_of_the_row_number():
    for n in range(1, 6):
        members = shapley_mm.coalitions(n)
        assert members.shape == (2 ** n, n) and members.dtype == torch.bool
        for k in range(2 ** n):
            assert set(members[k].nonzero().flatten().tolist()) == bits(k)


def test_benefit_is_coalition_size_when_correct_and_zero_for_the_empty_set():
    n = 3
    correct = torch.rand(8, 2 ** n, generator=torch.Generator().manual_seed(1)) > 0.5
    correct[:, 0] = True  # the empty coalition is worth 0 whatever its prediction
    v = shapley_mm.benefit(correct)
    assert v.dtype == torch.float32
    for k in range(2 ** n):
        assert torch.equal(v[:, k], correct[:, k].float() * len(bits(k)))


# ----------------------------------------------------------------------------------------------
# Eq. 2-3


@pytest.mark.parametrize("n", range(1, 8))
def test_permutation_weights_equal_the_closed_form_subset_formula(n):
    # Row k of the identity table is the value table that is 1 on coalition k only, so the
    # Shapley values of the identity are the coalition-to-modality weights themselves.
    weights = shapley_mm.shapley_values(torch.eye(2 ** n, dtype=torch.float64))  # [2**n, n]

    def w(size):  # |S|! (n - |S| - 1)! / n!
        return math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)

    expected = torch.zeros(2 ** n, n, dtype=torch.float64)
    for k in range(2 ** n):
        for i in range(n):
            if i in bits(k):  # k = S u {i}
                expected[k, i] = w(len(bits(k)) - 1)
            else:  # k = S
                expected[k, i] = -w(len(bits(k)))
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-12)


def permutation_counts(n):
    """Eq. 2-3 the way the weights were first counted: walk all n! orders; in each, modality i adds +1 on the
    coalition (its predecessors u {i}) and -1 on that of its predecessors. Returns {(coalition, i): count}."""
    counts = {}
    for order in itertools.permutations(range(n)):
        predecessors = 0
        for i in order:
            counts[predecessors | 1 << i, i] = counts.get((predecessors | 1 << i, i), 0) + 1
            counts[predecessors, i] = counts.get((predecessors, i), 0) - 1
            predecessors |= 1 << i
    return counts


@pytest.mark.parametrize("n", range(1, 9))
def test_weights_equal_the_permutation_counts_exactly_as_fractions(n):
    counts = shapley_mm._shapley_counts(n)  # [2**n, n], n! * the weights of Eq. 3
    walked = permutation_counts(n)
    assert counts.dtype == torch.float64 and counts.shape == (2 ** n, n)
    assert [[Fraction(int(c), math.factorial(n)) for c in row] for row in counts.tolist()] == \
        [[Fraction(walked.get((k, i), 0), math.factorial(n)) for i in range(n)] for k in range(2 ** n)]
    assert counts.eq(counts.round()).all()  # integers, not rounded weights


@pytest.mark.parametrize("n", range(1, 7))
def test_shapley_values_equal_a_brute_force_over_permutations(n):
    # integer tables, so that n! * phi is an exact integer and phi the correctly rounded rational
    v = torch.randint(-7, 8, (6, 2 ** n), generator=torch.Generator().manual_seed(n)).double()
    phi = shapley_mm.shapley_values(v)
    for row, row_phi in zip(v.tolist(), phi.tolist()):
        brute = [Fraction(0)] * n
        for order in itertools.permutations(range(n)):
            predecessors = 0
            for i in order:
                brute[i] += Fraction(int(row[predecessors | 1 << i] - row[predecessors]), math.factorial(n))
                predecessors |= 1 << i
        assert row_phi == [float(p) for p in brute]


@pytest.mark.parametrize("n", range(1, 7))
def test_efficiency(n):
    v = random_table(n)
    phi = shapley_mm.shapley_values(v)
    torch.testing.assert_close(phi.sum(1), v[:, -1] - v[:, 0])


@pytest.mark.parametrize("n", range(2, 7))
def test_symmetry(n):
    # make modalities 0 and 1 interchangeable: v(S) = v(S with 0 and 1 swapped)
    v = random_table(n)
    swapped = [k ^ 0b11 if (k & 1) != (k >> 1 & 1) else k for k in range(2 ** n)]
    phi = shapley_mm.shapley_values(v + v[:, swapped])
    torch.testing.assert_close(phi[:, 0], phi[:, 1])
    unsymmetrised = shapley_mm.shapley_values(v)
    assert not torch.allclose(unsymmetrised[:, 0], unsymmetrised[:, 1])


@pytest.mark.parametrize("n", range(1, 7))
def test_null_player_gets_zero(n):
    null = n - 1
    v = random_table(n)
    v = v[:, [k & ~(1 << null) for k in range(2 ** n)]]  # v(S u {null}) = v(S)
    phi = shapley_mm.shapley_values(v)
    torch.testing.assert_close(phi[:, null], torch.zeros_like(phi[:, null]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", range(1, 7))
def test_additivity(n):
    v, w = random_table(n, seed=1), random_table(n, seed=2)
    torch.testing.assert_close(shapley_mm.shapley_values(v + w),
                               shapley_mm.shapley_values(v) + shapley_mm.shapley_values(w))


@pytest.mark.parametrize("n", range(1, 7))
def test_additive_table_returns_its_per_modality_numbers(n):
    per_modality = torch.randn(5, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    v = per_modality @ shapley_mm.coalitions(n).double().T  # v(C) = sum_{i in C} c_i, [5, 2**n]
    torch.testing.assert_close(shapley_mm.shapley_values(v), per_modality)


def test_two_modalities_match_the_authors_closed_form_on_all_correctness_patterns():
    # columns: empty, {a}, {v}, {a, v}; the empty coalition's "prediction" must not matter
    patterns = torch.tensor(list(itertools.product([False, True], repeat=3)))  # [8, 3]
    for empty in (False, True):
        correct = torch.cat([torch.full((8, 1), empty), patterns], 1)  # [8, 4]
        phi = shapley_mm.shapley_values(shapley_mm.benefit(correct))
        v_a, v_v, v_av = correct[:, 1].float(), correct[:, 2].float(), 2 * correct[:, 3].float()
        torch.testing.assert_close(phi[:, 0], (v_a + v_av - v_v) / 2)
        torch.testing.assert_close(phi[:, 1], (v_v + v_av - v_a) / 2)


def test_shapley_values_keep_the_dtype_of_v_even_under_autocast():
    for dtype in (torch.float32, torch.float64):
        v = random_table(3).to(dtype)
        assert shapley_mm.shapley_values(v).dtype == dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            phi = shapley_mm.shapley_values(v)
        assert phi.dtype == dtype
        torch.testing.assert_close(phi, shapley_mm.shapley_values(v))


def test_shapley_values_reject_bad_tables():
    with pytest.raises(ValueError, match="v must have 2\\*\\*n columns"):
        shapley_mm.shapley_values(torch.zeros(4, 6))
    with pytest.raises(ValueError, match="v must have 2\\*\\*n columns"):
        shapley_mm.shapley_values(torch.zeros(4, 1))
    with pytest.raises(ValueError, match="floating-point"):
        shapley_mm.shapley_values(torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="BoolTensor"):
        shapley_mm.benefit(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="correct must have 2\\*\\*n columns"):
        shapley_mm.benefit(torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="n \\(number of modalities\\)"):
        shapley_mm.coalitions(0)


# ----------------------------------------------------------------------------------------------
# valuate: a toy model, against a slow reference that walks every permutation


def toy_model(n, batch_size=64, features_per_modality=3, num_classes=5, seed=0):
    """A fixed random linear model over n feature blocks; a modality is removed by zeroing its block."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch_size, n, features_per_modality, generator=generator)
    weight = torch.randn(n * features_per_modality, num_classes, generator=generator)
    bias = torch.randn(num_classes, generator=generator)
    labels = torch.randint(num_classes, (batch_size,), generator=generator)

    def predict(mask):  # mask: [B, n] bool -> logits [B, K]
        return (features * mask[:, :, None]).flatten(1) @ weight + bias

    return predict, labels


def reference_valuation(predict, labels, n):
    """Eq. 1-3 the slow way: every permutation separately, marginal contributions per Eq. 2."""
    batch_size = len(labels)

    def value(coalition):  # Eq. 1, [B]
        if not coalition:
            return torch.zeros(batch_size)
        mask = torch.zeros(batch_size, n, dtype=torch.bool)
        mask[:, sorted(coalition)] = True
        return (predict(mask).argmax(1) == labels).float() * len(coalition)

    phi = torch.zeros(batch_size, n)
    for order in itertools.permutations(range(n)):
        predecessors = set()
        for i in order:
            phi[:, i] += value(predecessors | {i}) - value(predecessors)  # Eq. 2
            predecessors.add(i)
    return phi / math.factorial(n)  # Eq. 3


@pytest.mark.parametrize("n", [2, 3, 4])
def test_valuate_equals_the_permutation_reference_and_predicts_each_coalition_once(n):
    predict, labels = toy_model(n, seed=n)
    masks = []

    def recording_predict(mask):
        masks.append(mask.clone())
        return predict(mask)

    phi = shapley_mm.valuate(recording_predict, labels, n)
    torch.testing.assert_close(phi, reference_valuation(predict, labels, n))
    assert phi.shape == (len(labels), n) and phi.dtype == torch.float32
    assert len(masks) == 2 ** n - 1
    coalitions_seen = set()
    for mask in masks:
        assert mask.dtype == torch.bool and mask.shape == (len(labels), n)
        assert mask.device == labels.device
        assert (mask == mask[0]).all()  # one coalition for the whole batch
        assert mask[0].any()  # never the empty coalition
        coalitions_seen.add(tuple(mask[0].tolist()))
    assert len(coalitions_seen) == 2 ** n - 1


def test_valuate_at_eleven_modalities_without_walking_the_orders(monkeypatch):
    def no_walk(*args):
        raise AssertionError("the weights of Eq. 3 walk all n! orders")

    monkeypatch.setattr(itertools, "permutations", no_walk)  # 11! = 39.9 M orders
    n = 11
    predict, labels = toy_model(n, batch_size=6, num_classes=2, seed=11)
    correct, _ = shapley_mm.coalition_correctness(predict, labels, n)
    exact = [exact_shapley(row, n) for row in correct.tolist()]  # the subset form, in Fractions
    phi = shapley_mm.valuate(predict, labels, n)
    assert phi.shape == (6, n) and phi.dtype == torch.float32
    assert torch.equal(phi, torch.tensor([[float(p) for p in row] for row in exact], dtype=torch.float64).float())
    assert [sum(row) for row in exact] == [n if row[-1] else 0 for row in correct.tolist()]  # efficiency


def test_valuate_rejects_bad_predictions_and_labels():
    predict, labels = toy_model(2)
    with pytest.raises(ValueError, match="logits"):
        shapley_mm.valuate(lambda mask: predict(mask)[:3], labels, 2)
    with pytest.raises(ValueError, match="labels"):
        shapley_mm.valuate(predict, labels[:, None], 2)


# ----------------------------------------------------------------------------------------------
# Eq. 10: sample-level re-sampling


def test_sample_level_copies_on_the_two_modality_grid():
    grid = torch.tensor([[-0.5, 0.0], [0.5, 1.0], [1.5, 0.5]])
    copies = shapley_mm.sample_level_copies(grid)
    assert copies.dtype == torch.long
    assert copies.tolist() == [[3, 2], [1, 0], [0, 1]]
    # on the grid the authors' thresholds are f_s(x) = 2x rounded
    assert torch.equal(copies, (2 * (1 - grid)).round().clamp(min=0).long())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_level_copies_at_the_thresholds(dtype):
    def just_below(x):
        x = torch.tensor(x, dtype=dtype)
        return torch.nextafter(x, torch.tensor(-math.inf, dtype=dtype)).item()

    phi = torch.tensor([[1.0, just_below(1.0)],
                        [0.4, just_below(0.4)],
                        [-0.1, just_below(-0.1)]], dtype=dtype)
    assert shapley_mm.sample_level_copies(phi).tolist() == [[0, 1], [1, 2], [2, 3]]


def test_sample_level_copies_with_a_custom_f_s():
    phi = torch.tensor([[0.5, 0.9], [1.0, -2.0], [1.2, 0.0]])
    seen = []

    def f_s(gap):
        seen.append(gap)
        return 4 * gap - 0.2

    copies = shapley_mm.sample_level_copies(phi, f_s)
    torch.testing.assert_close(seen[0], 1 - phi)  # f_s sees 1 - phi (Eq. 10)
    # 4 * 0.5 - 0.2 = 1.8 -> 2; 0.4 - 0.2 = 0.2 -> 0; phi >= 1 -> 0; 12 - 0.2 -> 12; 3.8 -> 4
    assert copies.tolist() == [[2, 0], [0, 12], [0, 4]]
    shifted = shapley_mm.sample_level_copies(phi, lambda gap: gap + 3)
    assert shifted.tolist() == [[4, 3], [0, 6], [0, 4]]  # f_s > 0 everywhere, still none at phi >= 1
    negative = shapley_mm.sample_level_copies(phi, lambda gap: gap - 5)
    assert negative.tolist() == [[0, 0], [0, 0], [0, 0]]  # clamped to >= 0
    with pytest.raises(ValueError, match="f_s must return"):
        shapley_mm.sample_level_copies(phi, lambda gap: gap.sum(1))
    with pytest.raises(ValueError, match="phi must be"):
        shapley_mm.sample_level_copies(torch.zeros(3, 2, dtype=torch.long))


def test_sample_level_copies_refuse_counts_that_are_no_integers():
    phi = torch.tensor([[1.0, 0.5], [0.0, 1.0]])
    # 1 / (1 - phi) is inf at phi = 1, where Eq. 10 gives no copy whatever f_s says
    assert shapley_mm.sample_level_copies(phi, lambda gap: 1 / gap).tolist() == [[0, 2], [1, 0]]
    for count in (math.inf, math.nan, 2.0 ** 70):
        with pytest.raises(ValueError, match=re.escape(f"f_s must return finite counts below 2**63, got {count} "
                                                       f"for sample 0, modality 1 (1 - phi = 0.5)")):
            shapley_mm.sample_level_copies(phi, lambda gap: torch.full_like(gap, count))
    assert shapley_mm.sample_level_copies(phi, lambda gap: torch.full_like(gap, -math.inf)).tolist() == [[0, 0], [0, 0]]


# ----------------------------------------------------------------------------------------------
# Table 4 ablations


def test_naive_copies_keep_per_modality_totals_and_are_reproducible():
    generator = torch.Generator().manual_seed(0)
    copies = torch.randint(0, 4, (200, 3), generator=generator)
    naive = shapley_mm.naive_copies(copies, generator=torch.Generator().manual_seed(5))
    assert torch.equal(naive.sort(0).values, copies.sort(0).values)  # same counts per modality
    assert not torch.equal(naive, copies)
    again = shapley_mm.naive_copies(copies, generator=torch.Generator().manual_seed(5))
    other = shapley_mm.naive_copies(copies, generator=torch.Generator().manual_seed(6))
    assert torch.equal(naive, again) and not torch.equal(naive, other)
    # columns are shuffled independently, not as whole rows
    rows = {tuple(row) for row in copies.tolist()}
    assert any(tuple(row) not in rows for row in naive.tolist())


def test_reversed_copies_go_to_the_highest_contributing_modality():
    phi = torch.tensor([[-0.5, 1.5, 0.0], [0.3, 0.1, 0.9]])
    copies = torch.tensor([[3, 0, 2], [1, 2, 0]])
    assert shapley_mm.reversed_copies(phi, copies).tolist() == [[0, 5, 0], [0, 0, 3]]
    with pytest.raises(ValueError, match="same shape"):
        shapley_mm.reversed_copies(phi[:, :2], copies)


def test_reversed_copies_break_ties_at_random_without_favouring_an_index():
    # phi = (0, 0, -1): every coalition wrong for modalities 0 and 1; modality 2 is never among the highest
    phi = torch.tensor([[0.0, 0.0, -1.0]]).repeat(2000, 1)
    copies = torch.tensor([[1, 1, 1]]).repeat(2000, 1)
    reversed_ = shapley_mm.reversed_copies(phi, copies, generator=torch.Generator().manual_seed(0))
    assert (reversed_.sum(1) == 3).all() and (reversed_[:, 2] == 0).all()
    assert ((reversed_ == 3).sum(1) == 1).all()  # all copies of a sample go to one modality
    share = (reversed_[:, 0] == 3).float().mean().item()
    assert 0.45 < share < 0.55  # binomial(2000, 1/2): 0.5 +- 0.011 (one std)
    again = shapley_mm.reversed_copies(phi, copies, generator=torch.Generator().manual_seed(0))
    assert torch.equal(reversed_, again)  # reproducible from the run's generator


# ----------------------------------------------------------------------------------------------
# Eq. 11 and Algorithm 2: modality-level re-sampling


def test_modality_level_plan_two_modalities():
    # mean phi = (0.5, 1.25): gaps (0.5, -0.25), x = 0.75 * 2/3 = 0.5
    phi = torch.tensor([[0.0, 1.0], [1.0, 1.5]])
    assert shapley_mm.modality_level_plan(phi) == (0, pytest.approx(0.5))
    assert shapley_mm.modality_level_plan(phi, alpha=1.5) == (0, pytest.approx(0.75))
    assert shapley_mm.modality_level_plan(phi, f_m="tanh") == (0, pytest.approx(math.tanh(0.5)))
    assert shapley_mm.modality_level_plan(phi, alpha=2, f_m="tanh") == (0, pytest.approx(math.tanh(1.0)))
    assert shapley_mm.modality_level_plan(phi, f_m="square") == (0, pytest.approx(0.5 ** 1.5))
    assert shapley_mm.modality_level_plan(phi, alpha=3) == (0, 1.0)  # 1.5 clipped to 1
    assert shapley_mm.modality_level_plan(phi.flip(1)) == (1, pytest.approx(0.5))


def test_modality_level_plan_matches_the_authors_gap_formula_for_two_modalities():
    phi = torch.rand(50, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 0.5
    gap_a, gap_v = (1 - phi.mean(0)).tolist()
    modality, probability = shapley_mm.modality_level_plan(phi)
    assert modality == int(phi.mean(0).argmin())
    assert probability == pytest.approx(abs(gap_a - gap_v) * 2 / 3)


def test_modality_level_plan_three_modalities():
    # mean phi = (1.0, 0.25, 1.25): d = ((1 - 0.25) + (1.25 - 0.25)) / 2 = 0.875, x = 0.875 * 2/3
    phi = torch.tensor([[1.0, 0.5, 1.0], [1.0, 0.0, 1.5]])
    assert shapley_mm.modality_level_plan(phi) == (1, pytest.approx(0.875 * 2 / 3))
    assert shapley_mm.modality_level_plan(phi, f_m="square") == (1, pytest.approx((0.875 * 2 / 3) ** 1.5))


def test_modality_level_plan_rejects_bad_input():
    phi = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="linear.*tanh.*square"):
        shapley_mm.modality_level_plan(phi, f_m="cubic")
    for alpha in (-1, math.nan, math.inf):
        with pytest.raises(ValueError, match=f"alpha must be a finite number >= 0 .*, got {alpha}"):
            shapley_mm.modality_level_plan(phi, alpha=alpha)
    for value in (math.nan, math.inf, -math.inf):
        contributions = torch.tensor([[0.5, 1.5], [1.0, value]])
        with pytest.raises(ValueError, match=f"phi_subset must hold finite contributions, got {value} in row 1, "
                                             f"modality 1"):
            shapley_mm.modality_level_plan(contributions)
    with pytest.raises(ValueError, match="phi_subset"):
        shapley_mm.modality_level_plan(torch.zeros(4, 1))
    with pytest.raises(ValueError, match="phi_subset"):
        shapley_mm.modality_level_plan(torch.zeros(0, 2))


def test_modality_level_copies_draw_int_p_times_n_samples_for_one_modality():
    num_samples, probability = 1000, 0.29
    copies = shapley_mm.modality_level_copies(num_samples, 3, 2, probability,
                                              generator=torch.Generator().manual_seed(0))
    assert copies.shape == (num_samples, 3) and copies.dtype == torch.long
    assert copies[:, 2].sum() == int(probability * num_samples)
    assert copies[:, :2].sum() == 0
    assert copies[:, 2].max() > 1  # with replacement: some sample is drawn twice
    again = shapley_mm.modality_level_copies(num_samples, 3, 2, probability,
                                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(copies, again)
    assert shapley_mm.modality_level_copies(10, 2, 0, 0.0).sum() == 0
    with pytest.raises(ValueError, match="probability"):
        shapley_mm.modality_level_copies(10, 2, 0, 1.5)
    with pytest.raises(ValueError, match="modality"):
        shapley_mm.modality_level_copies(10, 2, 2, 0.5)
    with pytest.raises(ValueError, match="num_samples"):
        shapley_mm.modality_level_copies(0, 2, 0, 0.5)


# ----------------------------------------------------------------------------------------------
# Algorithms 1-2: the copy list


def test_expand_copies_round_trips_and_is_ordered_by_sample_then_modality():
    copies = torch.randint(0, 4, (50, 3), generator=torch.Generator().manual_seed(7))
    sample_index, modality = shapley_mm.expand_copies(copies)
    assert len(sample_index) == len(modality) == copies.sum()
    cell = sample_index * 3 + modality
    assert torch.equal(torch.bincount(cell, minlength=copies.numel()).view(50, 3), copies)
    assert (cell[1:] >= cell[:-1]).all()
    assert shapley_mm.expand_copies(torch.tensor([[0, 2], [1, 0]]))[0].tolist() == [0, 0, 1]
    assert shapley_mm.expand_copies(torch.tensor([[0, 2], [1, 0]]))[1].tolist() == [1, 1, 0]


def test_copy_tables_must_be_non_negative_long_tables():
    with pytest.raises(ValueError, match="copies"):
        shapley_mm.expand_copies(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match="copies"):
        shapley_mm.expand_copies(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="copies"):
        shapley_mm.naive_copies(torch.tensor([1, 2]))


# ----------------------------------------------------------------------------------------------
# Exactness for any n: the rules decide as exact rational arithmetic does (Fraction reference)


def exact_shapley(correct_row, n):
    """Eq. 1-3 in exact rational arithmetic with the subset form of the Shapley value:
    phi_i = sum over S not holding i of |S|! (n - |S| - 1)! / n! * (v(S u {i}) - v(S))."""
    def value(coalition):  # Eq. 1
        return len(bits(coalition)) if coalition and correct_row[coalition] else 0

    phi = []
    for i in range(n):
        total = Fraction(0)
        for coalition in range(2 ** n):
            if coalition >> i & 1:
                continue
            size = len(bits(coalition))
            weight = Fraction(math.factorial(size) * math.factorial(n - size - 1), math.factorial(n))
            total += weight * (value(coalition | 1 << i) - value(coalition))
        phi.append(total)
    return phi


def exact_copies(phi_row):
    """The authors' f_s of Eq. 10 on exact contributions."""
    return [(p < 1) + (p < Fraction(2, 5)) + (p < Fraction(-1, 10)) for p in phi_row]


def correctness_table(n, rows, seed):
    """Random coalition correctness [rows, 2**n], with an all-correct and an all-wrong row, and rows whose
    contributions sit exactly on the thresholds 0.4 and -0.1 where such rows exist (n >= 5)."""
    generator = torch.Generator().manual_seed(seed)
    correct = torch.rand(rows, 2 ** n, generator=generator) < torch.rand(rows, 1, generator=generator)
    correct[0], correct[1] = True, False
    if n >= 5:  # candidates from float values, kept only when exactly on a threshold
        search = torch.rand(20000, 2 ** n, generator=generator) < 0.5
        phi = shapley_mm.shapley_values(shapley_mm.benefit(search)).double()
        near = (((phi - 0.4).abs() < 1e-4) | ((phi + 0.1).abs() < 1e-4)).any(1)
        on_threshold = [row for row in search[near][:20] if any(p in (Fraction(2, 5), Fraction(-1, 10))
                                                                for p in exact_shapley(row.tolist(), n))]
        assert on_threshold, "no row with a contribution of exactly 0.4 or -0.1 found"
        correct = torch.cat([correct, torch.stack(on_threshold[:4])])
    return correct


@pytest.mark.parametrize("n", range(2, 9))
def test_decisions_equal_exact_rational_arithmetic(n):
    correct = correctness_table(n, rows=40 if n < 8 else 12, seed=n)
    exact = [exact_shapley(row, n) for row in correct.tolist()]
    phi = shapley_mm.shapley_values(shapley_mm.benefit(correct))  # float32, as valuate returns
    assert phi.dtype == torch.float32
    assert phi[0].tolist() == [1.0] * n  # all coalitions correct: exactly 1 each
    assert phi[1].tolist() == [0.0] * n
    # every value is the rational correctly rounded to float32
    assert torch.equal(phi, torch.tensor([[float(p) for p in row] for row in exact], dtype=torch.float64).float())
    # efficiency: exactly on the numerators, to rounding on the floats
    for row_phi, row_exact, row_correct in zip(phi, exact, correct):
        assert sum(row_exact) == (n if row_correct[-1] else 0)
        assert row_phi.double().sum().item() == pytest.approx(n if row_correct[-1] else 0, abs=1e-5)

    copies = shapley_mm.sample_level_copies(phi)  # Eq. 10
    assert copies.tolist() == [exact_copies(row) for row in exact]
    if n >= 5:
        assert any(p in (Fraction(2, 5), Fraction(-1, 10)) for row in exact for p in row)

    # naive: a permutation of each column of the exact table
    exact_table = torch.tensor([exact_copies(row) for row in exact])
    naive = shapley_mm.naive_copies(copies, generator=torch.Generator().manual_seed(1))
    assert torch.equal(naive, shapley_mm.naive_copies(exact_table, generator=torch.Generator().manual_seed(1)))

    # reversed: every copy of a sample goes to one of its exactly highest modalities
    reversed_ = shapley_mm.reversed_copies(phi, copies, generator=torch.Generator().manual_seed(2))
    for row_exact, row_copies, row_reversed in zip(exact, copies.tolist(), reversed_.tolist()):
        highest = {i for i, p in enumerate(row_exact) if p == max(row_exact)}
        assert sum(row_reversed) == sum(row_copies)
        assert {i for i, c in enumerate(row_reversed) if c} <= highest

    # Eq. 11: the argmin of the exact means and the exact gap
    means = [sum(column) / len(exact) for column in zip(*exact)]
    low = min(range(n), key=lambda i: (means[i], i))
    gap = sum(m - means[low] for m in means) / (n - 1)
    for f_m in shapley_mm.F_M_CHOICES:
        modality, probability = shapley_mm.modality_level_plan(phi, f_m=f_m)
        assert modality == low
        expected = {"linear": float(gap) * 2 / 3, "tanh": math.tanh(float(gap) * 2 / 3),
                    "square": (float(gap) * 2 / 3) ** 1.5}[f_m]
        assert probability == pytest.approx(min(expected, 1.0), rel=1e-12, abs=0)


@pytest.mark.parametrize("n", [6, 7, 8])
@pytest.mark.parametrize("f_m", shapley_mm.F_M_CHOICES)
def test_modality_level_plan_with_equal_means_gives_probability_zero(n, f_m):
    # rows that are permutations of one another give every modality the same mean; the float sums differ
    generator = torch.Generator().manual_seed(n)
    row = torch.rand(1, 2 ** n, generator=generator) < 0.5
    phi = shapley_mm.shapley_values(shapley_mm.benefit(row))[0]  # [n]
    phi = torch.stack([phi.roll(k) for k in range(n)])  # [n, n], each column holds every value once
    assert shapley_mm.modality_level_plan(phi, f_m=f_m) == (0, 0.0)


def test_modality_level_plan_on_general_real_contributions_uses_float_means():
    phi = torch.tensor([[0.123, 0.7], [0.4567, 0.2]], dtype=torch.float64)  # not multiples of 1/2
    mean = phi.mean(0)
    assert shapley_mm.modality_level_plan(phi) == (0, pytest.approx((mean[1] - mean[0]).item() * 2 / 3))


@pytest.mark.parametrize("n", [3, 5])
def test_valuate_on_a_toy_model_gives_the_exact_copies(n):
    toy_predict, labels = toy_model(n, batch_size=128, num_classes=2, seed=10 + n)
    always_right = torch.zeros(128, 2)
    always_right[:16] = 100 * torch.nn.functional.one_hot(labels[:16], 2)  # the first 16 rows: every coalition correct

    def predict(mask):
        return toy_predict(mask) + always_right

    members = shapley_mm.coalitions(n)
    correct = [[bool(k) for k in range(2 ** n)] for _ in labels]  # filled below, coalition by coalition
    for k in range(1, 2 ** n):
        hit = predict(members[k].repeat(len(labels), 1)).argmax(1) == labels
        for row, value in zip(correct, hit.tolist()):
            row[k] = value
    exact = [exact_shapley(row, n) for row in correct]
    phi = shapley_mm.valuate(predict, labels, n)
    assert shapley_mm.sample_level_copies(phi).tolist() == [exact_copies(row) for row in exact]
    assert all(all(row[1:]) for row in correct[:16])  # the case float rounding used to break

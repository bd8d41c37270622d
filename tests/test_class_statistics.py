"""HiDe's building blocks: the MLP mapping, class statistics, pseudo-feature sampling, task-adaptive prediction and
the contrastive regularisation, each against a direct computation."""
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.class_statistics import ClassStatistics, ContrastiveRegularizer, task_adaptive_prediction
from models.original_model import MlpMapping, TaskIdentityHead
from models.prompts import PromptPool


def test_mlp_mapping_structures_and_parameter_counts():
    two = MlpMapping(768, [2])
    assert [type(m) for m in two.f] == [nn.Linear, nn.GELU, nn.Linear]
    assert sum(p.numel() for p in two.parameters()) == 2_363_136  # the reference's [2] mapping, its norm included
    four = MlpMapping(768, [4, 4])
    assert [type(m) for m in four.f] == [nn.Linear, nn.GELU, nn.Linear, nn.LayerNorm, nn.Linear]
    assert [(m.in_features, m.out_features) for m in four.f if isinstance(m, nn.Linear)] == [
        (768, 3072), (3072, 3072), (3072, 768)]
    assert four.f[3].normalized_shape == (3072,)
    h = torch.randn(3, 768)
    assert torch.allclose(two(h), F.layer_norm(h + two.f(h), (768,), two.norm.weight, two.norm.bias))
    assert isinstance(TaskIdentityHead(8, 5, []).mlp, nn.Identity)


def test_contrastive_term_equals_the_formula_in_float64_with_and_without_prototypes():
    torch.manual_seed(0)
    prototypes, features = torch.randn(7, 6, dtype=torch.float64), torch.randn(4, 6, requires_grad=True)

    def direct(rows: torch.Tensor) -> torch.Tensor:
        sim = rows @ rows.T / 0.8
        return F.cross_entropy(sim, torch.arange(rows.shape[0]))

    regularizer = ContrastiveRegularizer()
    regularizer.set_prototypes(torch.zeros(0, 6))
    assert torch.allclose(regularizer(features), direct(features.double()), atol=1e-12)
    regularizer.set_prototypes(prototypes.float())
    ours = regularizer(features)
    expected = direct(torch.cat([prototypes.float().double(), features.double()]))
    assert ours.dtype == torch.float64 and torch.allclose(ours, expected, atol=1e-12)
    grad_ours, = torch.autograd.grad(ours, features)
    grad_expected, = torch.autograd.grad(expected, features)
    assert torch.allclose(grad_ours, grad_expected, atol=1e-12)


def _features(per_class: int = 40, dim: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(per_class)
    return torch.randn(len(labels), dim, generator=gen) + labels[:, None] * 3.0, labels


def test_variance_and_covariance_statistics_equal_direct_computation():
    x, y = _features()
    variance = ClassStatistics("variance", 4, 5, 10)
    variance.update(x, y, [0, 2], seed=0)
    assert variance.present[:, 0].tolist() == [True, False, True, False]
    assert torch.allclose(variance.mean[2, 0], x[y == 2].mean(0))
    assert torch.allclose(variance.var[2, 0], torch.cov(x[y == 2].T).diagonal() + 1e-4)
    covariance = ClassStatistics("covariance", 4, 5, 10)
    covariance.update(x, y, [1], seed=0)
    assert torch.allclose(covariance.cov[1], torch.cov(x[y == 1].T) + 1e-4 * torch.eye(5))
    assert covariance.prototypes().shape == (1, 5)


def test_multi_centroid_statistics_are_seeded_k_means_cluster_moments():
    from sklearn.cluster import KMeans
    x, y = _features()
    stats = ClassStatistics("multi-centroid", 3, 5, n_centroids=4)
    stats.update(x, y, [0, 1, 2], seed=7)
    members = x[y == 1].numpy()
    labels = KMeans(n_clusters=4, n_init=10, random_state=7 + 1).fit(members).labels_
    expected_means = np.stack([members[labels == k].mean(0) for k in range(4)])
    expected_vars = np.stack([members[labels == k].var(0) for k in range(4)])  # biased, as np.var
    assert np.allclose(stats.mean[1].numpy(), expected_means, atol=1e-6)
    assert np.allclose(stats.var[1].numpy(), expected_vars, atol=1e-6)
    again = ClassStatistics("multi-centroid", 3, 5, n_centroids=4)
    again.update(x, y, [0, 1, 2], seed=7)
    assert torch.equal(again.mean, stats.mean)  # same seed, same centroids (and so on every rank)
    assert stats.prototypes().shape == (12, 5)
    small = ClassStatistics("multi-centroid", 3, 5, n_centroids=4)
    small.update(x[:3], y[:3], [0], seed=0)  # fewer samples than centroids: one cluster each
    assert small.present[0].tolist() == [True, True, True, False]


def test_sampling_draws_only_what_is_used_from_the_right_gaussians():
    x, y = _features(per_class=60)
    stats = ClassStatistics("multi-centroid", 3, 5, n_centroids=2)
    stats.update(x, y, [0, 1, 2], seed=0)
    stats.var[2, 1] = 0.0  # a single-member centroid: skipped, as in the reference
    gen = torch.Generator().manual_seed(0)
    z, labels = stats.sample([0, 2], per_component=4, count=10, generator=gen)
    assert z.shape == (10, 5) and set(labels.tolist()) <= {0, 2}
    z, labels = stats.sample([0, 2], per_component=4, count=100, generator=gen)
    assert z.shape == (12, 5)  # 3 usable components x 4 draws: never more than exist
    # two far-apart components of class 1: each draw is plainly from one of them
    stats.mean[1] = torch.tensor([[0.0] * 5, [100.0] * 5])
    stats.var[1] = torch.tensor([[1.0] * 5, [4.0] * 5])
    big, labels = stats.sample([1], per_component=100_000, count=100_000, generator=gen)
    first = big[big.mean(1) < 50]
    assert abs(first.shape[0] / 100_000 - 0.5) < 0.01  # a uniform share of the draw slots
    assert torch.allclose(first.mean(0), torch.zeros(5), atol=0.03)
    assert torch.allclose(first.var(0), torch.full((5,), 1.0 + 1e-4), rtol=0.05)
    assert torch.allclose(big[big.mean(1) >= 50].std(0), torch.full((5,), 2.0), rtol=0.05)


def test_task_adaptive_prediction_runs_the_reference_schedule_and_masks_unseen_classes():
    x, y = _features()
    stats = ClassStatistics("variance", 4, 5, 10)
    stats.update(x, y, [0, 1, 2], seed=0)
    head = nn.Linear(5, 4)
    batches = []

    def classify(z):
        batches.append(z.shape[0])
        return head(z)

    seen = torch.tensor([True, True, True, False])
    before = head.weight[3].clone()
    accuracy_before = (head(x)[:, :3].argmax(1) == y).float().mean()
    task_adaptive_prediction(list(head.parameters()), classify, stats, [0, 1, 2], seen, iterations=2,
                             per_component=6, epochs=40, lr=0.1, weight_decay=0.0, seed=0)
    assert batches == [6] * 80  # epochs x iterations steps of per_component pseudo-features
    assert torch.equal(head.weight[3], before)  # the unseen class gets no gradient
    accuracy_after = (head(x)[:, :3].argmax(1) == y).float().mean()  # the real features, never seen in training
    assert accuracy_after > 0.75 and accuracy_after > accuracy_before + 0.3


def test_prompt_momentum_mixes_slot_t_with_the_mean_of_the_earlier_slots():
    pool = PromptPool(2, 4, 3, 8, 2, prefix=True, top_k=1, learn_keys=False)
    prompt = pool.prompt.detach().clone()
    mixed = pool.with_momentum(2, 0.25)
    expected = 0.75 * prompt[:, :, 2] + 0.25 * prompt[:, :, :2].mean(2)
    assert torch.allclose(mixed[:, :, 2], expected) and torch.equal(mixed[:, :, 3], prompt[:, :, 3])
    mixed[:, :, 2].sum().backward()
    grad = pool.prompt.grad
    assert torch.allclose(grad[:, :, 2], torch.full_like(grad[:, :, 2], 0.75))
    assert grad[:, :, [0, 1, 3]].abs().sum() == 0  # the earlier slots enter detached
    pool.apply_momentum(2, 0.25)
    assert torch.allclose(pool.prompt[:, :, 2], expected)


@pytest.mark.parametrize("storage", ["variance", "covariance"])
def test_sampling_per_class_storage(storage):
    x, y = _features()
    stats = ClassStatistics(storage, 3, 5, 10)
    stats.update(x, y, [0, 1, 2], seed=0)
    z, labels = stats.sample([0, 1, 2], per_component=50_000, count=150_000, generator=torch.Generator().manual_seed(1))
    for c in range(3):
        draws = z[labels == c]
        assert torch.allclose(draws.mean(0), stats.mean[c, 0], atol=0.05)
        expected = stats.cov[c] if storage == "covariance" else torch.diag(stats.var[c, 0])
        assert torch.allclose(torch.cov(draws.T), expected, atol=0.06)


def _covariance_statistics(num_classes: int, dim: int, seed: int = 0) -> ClassStatistics:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(3 * dim)
    scale = torch.rand(num_classes, dim, generator=gen) * 2 + 0.1  # a different spread per class and dimension
    features = torch.randn(len(labels), dim, generator=gen) @ torch.randn(dim, dim, generator=gen) * scale[labels]
    stats = ClassStatistics("covariance", num_classes, dim, 1)
    stats.update(features + labels[:, None].float(), labels, list(range(num_classes)), seed=0)
    return stats


def test_covariance_sampling_equals_a_per_draw_computation_from_the_same_random_draws():
    stats = _covariance_statistics(4, 6)
    classes, per_component, count = [3, 0, 2, 1], 5, 13
    z, labels = stats.sample(classes, per_component, count, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # the draws it consumes: randperm of the slots, then the noise
    slots = torch.randperm(len(classes) * per_component, generator=gen)[:count]
    noise = torch.randn(count, 6, generator=gen)
    expected_labels = torch.tensor(classes)[slots // per_component]
    expected = torch.stack([stats.mean[c, 0] + torch.linalg.cholesky(stats.cov[c]) @ n
                            for c, n in zip(expected_labels.tolist(), noise, strict=True)])
    assert torch.equal(labels, expected_labels)
    assert torch.allclose(z, expected, atol=1e-5, rtol=1e-5)


def _peak_cpu_bytes(fn: Callable[[], object]) -> int:
    """The most bytes the CPU allocator held during `fn()` beyond what it held before, from the profiler's
    allocation and free events in time order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def test_covariance_sampling_memory_grows_with_the_classes_not_the_draws():
    num_classes, dim, draws = 10, 64, 4000
    stats = _covariance_statistics(num_classes, dim)
    peak = _peak_cpu_bytes(lambda: stats.sample(list(range(num_classes)), 400, draws,
                                                torch.Generator().manual_seed(0)))
    assert peak >= draws * dim * 4  # the measurement sees at least the output
    # 4 bytes x (4 x classes x d^2 + 6 x draws x d): 6.8 MB here, 2.3 GB at d=768, 200 classes, 21,600 draws
    # (ImageNet-R's last task); a factor per draw holds draws x d^2 floats: 66 MB here, 47.5 GiB there
    assert peak < 4 * (4 * num_classes * dim * dim + 6 * draws * dim), peak

"""Prompt pool: selection, majority vote, pull term, training mask, slot initialisation, prefix layout."""
import torch
import torch.nn.functional as F

from models.prompts import PromptPool, batch_majority


def _pool(prefix=True, pool_size=4, top_k=1, length=3):
    torch.manual_seed(0)
    return PromptPool(num_layers=2, pool_size=pool_size, length=length, embed_dim=8, num_heads=2, prefix=prefix,
                      top_k=top_k)


def test_shapes_follow_the_reference():
    assert _pool(prefix=True).prompt.shape == (2, 2, 4, 3, 2, 4)
    assert _pool(prefix=False).prompt.shape == (2, 4, 3, 8)
    pool = _pool()
    assert pool.key.shape == (4, 8) and pool.prompt.abs().max() <= 1.0


def test_key_matching_picks_the_most_similar_key_and_the_pull_term_is_its_cosine():
    pool = _pool(top_k=2)
    with torch.no_grad():
        pool.key.copy_(torch.eye(4, 8))
    query = torch.tensor([[0.0, 3.0, 1.0, 0, 0, 0, 0, 0], [0.0, 0.0, 0.0, 5.0, 0, 0, 0, 0]])
    idx, sim = pool.select(query)
    assert idx[0].tolist() == [1, 2]  # cosines 3/sqrt(10) and 1/sqrt(10)
    assert idx[1, 0] == 3  # sample 1 is similar to key 3 only (the second choice is a tie at 0)
    expected = F.cosine_similarity(query[:, None], pool.key[None], dim=-1)
    assert torch.allclose(sim, expected, atol=1e-6)
    pull = PromptPool.pull_term(sim, idx)
    assert torch.allclose(pull, (sim[0, 1] + sim[0, 2] + sim[1, idx[1, 0]] + sim[1, idx[1, 1]]) / 2)


def test_batch_majority_vote():
    assert batch_majority(torch.tensor([[1], [2], [2], [3]]), 10, 1).tolist() == [[2]] * 4
    assert batch_majority(torch.tensor([[0, 1], [1, 2], [1, 2]]), 10, 2).tolist() == [[1, 2]] * 3
    pool = _pool()
    with torch.no_grad():
        pool.key.copy_(torch.eye(4, 8))
    query = torch.stack([torch.eye(8)[2], torch.eye(8)[2], torch.eye(8)[0]])
    assert pool.select(query, batchwise=True)[0].tolist() == [[2], [2], [2]]
    assert pool.select(query, batchwise=False)[0].tolist() == [[2], [2], [0]]


def _batch_majority_with_unique(idx: torch.Tensor, pool_size: int, top_k: int) -> torch.Tensor:
    """The vote as first written, with torch.unique (which reads the number of ids back to the host)."""
    ids, counts = torch.unique(idx, return_counts=True, sorted=True)
    if ids.numel() < pool_size:
        pad = pool_size - ids.numel()
        ids = torch.cat([ids, ids.new_full((pad,), int(idx.min()))])
        counts = torch.cat([counts, counts.new_zeros(pad)])
    major = ids[torch.topk(counts, k=top_k).indices]
    return major.unsqueeze(0).expand(idx.shape[0], -1)


def test_batch_majority_returns_exactly_what_the_unique_based_vote_returns_ties_and_padding_included():
    gen = torch.Generator().manual_seed(0)
    cases = padded = 0
    for pool_size in range(5, 11):
        for top_k in range(1, 6):
            for batch in range(1, 17):
                draws = [torch.rand(batch, pool_size, generator=gen).argsort(1)[:, :top_k],  # as key matching
                         torch.randint(pool_size, (batch, top_k), generator=gen),  # repeats within a row
                         torch.randint(2, (batch, top_k), generator=gen) * (pool_size - 1),  # few ids: padding wins
                         torch.full((batch, top_k), pool_size - 1)]
                for idx in draws:
                    expected = _batch_majority_with_unique(idx, pool_size, top_k)
                    assert torch.equal(batch_majority(idx, pool_size, top_k), expected), (pool_size, top_k, idx)
                    cases += 1
                    padded += idx.unique().numel() < top_k  # topk then picks padding entries too
    assert cases == 6 * 5 * 16 * 4 and padded > 500


def test_training_mask_uses_slot_t():
    assert _pool(top_k=1).task_slots(2, batch=3).tolist() == [[2], [2], [2]]
    assert _pool(pool_size=8, top_k=2).task_slots(1, batch=1).tolist() == [[2, 3]]


def test_slot_t_starts_from_slot_t_minus_1():
    pool = _pool()
    before = pool.prompt.detach().clone()
    keys = pool.key.detach().clone()
    pool.init_slots_from_previous(2)
    assert torch.equal(pool.prompt[:, :, 2], before[:, :, 1])
    for slot in (0, 1, 3):
        assert torch.equal(pool.prompt[:, :, slot], before[:, :, slot])
    assert torch.equal(pool.key, keys)
    pool.init_slots_from_previous(3, copy_keys=True)
    assert torch.equal(pool.key[3], keys[2])
    pool.init_slots_from_previous(0)  # task 0 has no predecessor
    assert torch.equal(pool.prompt[:, :, 0], before[:, :, 0])


def test_correct_prefix_layout_gives_each_sample_its_own_keys_and_values():
    pool = _pool(top_k=2, pool_size=4)
    idx = torch.tensor([[0, 3], [2, 1]])
    out = pool.gather(idx)
    assert out.shape == (2, 2, 2, 6, 2, 4)  # layers, B, key/value, top_k*length, heads, head_dim
    for b in range(2):
        for kv in range(2):
            expected = torch.cat([pool.prompt[:, kv, idx[b, 0]], pool.prompt[:, kv, idx[b, 1]]], dim=1)
            assert torch.equal(out[:, b, kv], expected)


def test_legacy_reshape_mixes_halves_and_samples_exactly_as_the_reference():
    pool = _pool(top_k=1)
    keys, values = pool.prompt[:, 0], pool.prompt[:, 1]  # (layers, pool, length, heads, head_dim)
    legacy = pool.gather(torch.tensor([[0], [3]]), legacy_reshape=True)
    # sample 0 gets the key halves of both samples' prompts, sample 1 the value halves
    assert torch.equal(legacy[:, 0, 0], keys[:, 0]) and torch.equal(legacy[:, 0, 1], keys[:, 3])
    assert torch.equal(legacy[:, 1, 0], values[:, 0]) and torch.equal(legacy[:, 1, 1], values[:, 3])
    correct = pool.gather(torch.tensor([[0], [3]]))
    assert torch.equal(correct[:, 0, 0], keys[:, 0]) and torch.equal(correct[:, 0, 1], values[:, 0])
    # they agree only where the two layouts coincide: sample 0's key and sample 1's value
    assert torch.equal(legacy[:, 0, 0], correct[:, 0, 0]) and torch.equal(legacy[:, 1, 1], correct[:, 1, 1])
    assert not torch.equal(legacy[:, 0, 1], correct[:, 0, 1]) and not torch.equal(legacy[:, 1, 0], correct[:, 1, 0])


def test_prompt_tuning_gather_joins_the_chosen_slots():
    pool = _pool(prefix=False, top_k=2)
    out = pool.gather(torch.tensor([[3, 1]]))
    assert out.shape == (2, 1, 6, 8)
    assert torch.equal(out[:, 0], torch.cat([pool.prompt[:, 3], pool.prompt[:, 1]], dim=1))

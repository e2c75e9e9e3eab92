"""common/teacher.py: which successful peer a row's teacher sees, and scores taken once per row."""
import torch

from common.teacher import ScoredOnce, choose_peers


def test_peer_never_self_same_group_successful_and_fallbacks():
    # Group 0: all fail; group 1: one success (row 5); group 2: three successes; group 3: all succeed.
    correct = torch.tensor([0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 1, 1, 1, 1, 1, 1], dtype=torch.bool)
    lengths = torch.tensor([5, 6, 7, 8, 9, 3, 2, 1, 7, 2, 4, 4, 9, 8, 7, 6])
    for mode in ("random", "first", "shortest"):
        for seed in range(20):
            peers = choose_peers(correct, 4, mode, torch.Generator().manual_seed(seed), lengths)
            assert peers.dtype == torch.long and peers.shape == (16,)
            assert (peers[:4] == -1).all()  # all-fail group: answer-only fallback
            assert peers[5] == -1 and (peers[[4, 6, 7]] == 5).all()  # the only success has no peer
            for i, p in enumerate(peers.tolist()[8:], start=8):
                assert p != i and p // 4 == i // 4 and correct[p]
    first = choose_peers(correct, 4, "first")
    assert first[8:].tolist() == [10, 8, 8, 8, 13, 12, 12, 12]
    shortest = choose_peers(correct, 4, "shortest", lengths=lengths)
    assert shortest[8:].tolist() == [10, 10, 11, 10, 15, 15, 15, 14]  # ties (rows 10, 11) go to the lower index


def test_random_peer_is_uniform_over_other_successes_and_leaves_global_rng_alone():
    correct = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    state = torch.random.get_rng_state()
    draws = torch.stack([choose_peers(correct, 8, "random", torch.Generator().manual_seed(s)) for s in range(3000)])
    assert torch.equal(torch.random.get_rng_state(), state)
    for row, options in [(0, [1, 3, 4, 6]), (3, [1, 4, 6])]:
        counts = torch.tensor([(draws[:, row] == j).sum().item() for j in options], dtype=torch.float)
        assert counts.sum() == 3000
        expected = 3000 / len(options)
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 16.3  # chi-square, <= 3 degrees of freedom, p = 0.001
    again = choose_peers(correct, 8, "random", torch.Generator().manual_seed(7))
    assert torch.equal(again, draws[7])


def test_scored_once_scores_each_row_once_and_keeps_every_row():
    """Micro-batch by micro-batch (rows given) or the whole batch at once: each row is scored once, later calls read
    what was kept, and `values` holds every row's value in batch order, whichever way it was filled."""
    calls = []

    def score(rows, gather_index, **stats):
        calls.append((rows, gather_index, stats))
        r = torch.tensor(rows, dtype=torch.float)
        return {"logprobs": r[:, None] * torch.ones(1, 3), "prompt_len": r + 100}

    by_rows = ScoredOnce(5, score)
    for rows in (torch.tensor([3, 1]), torch.tensor([0, 4, 2])):
        out = by_rows(rows, gather_index=rows * 10)
        assert out["logprobs"][:, 0].tolist() == rows.float().tolist()
    assert [(c[0], c[1].tolist()) for c in calls] == [([3, 1], [30, 10]), ([0, 4, 2], [0, 40, 20])]
    again = by_rows(torch.tensor([4, 3]))  # already scored: read back, not scored again
    assert len(calls) == 2 and again["prompt_len"].tolist() == [104.0, 103.0]
    assert by_rows.values["logprobs"][:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and by_rows.seconds > 0

    whole = ScoredOnce(5, score)
    whole(return_hidden=True)
    assert calls[-1] == ([0, 1, 2, 3, 4], None, {"return_hidden": True})
    assert torch.equal(whole(torch.tensor([2, 0]))["prompt_len"], torch.tensor([102.0, 100.0])) and len(calls) == 3
    assert torch.equal(whole.values["logprobs"], by_rows.values["logprobs"])

"""hsd.py: peer choice, the hindsight block, divergence diagnostics, skip masking, end-to-end runs."""
import functools
import json
import zlib

import pytest
import torch
import tyro

import grpo
import hsd
from common import batch as batch_module
from common.args import ArgError
from common.example import Example
from common.logprobs import token_stats
from common.verifiers import Verdict


def test_hindsight_block_format_and_fallback():
    assert hsd.hindsight_block("12+34=46\nAnswer: 46", "46") == \
        "A correct solution:\n\n12+34=46\nAnswer: 46\n\nThe correct final answer is: 46"
    ex = Example("Compute 12+34.", "46")
    assert hsd.privileged_block(ex, "  raw text, kept as is \n") == \
        "A correct solution:\n\n  raw text, kept as is \n\n\nThe correct final answer is: 46"
    assert hsd.privileged_block(ex, None) == hsd.answer_block(ex) == "The correct final answer is: 46"


def test_divergence_index_hand_built():
    P = 0  # padding id; equal padding beyond the lengths must not extend the prefix
    a = torch.tensor([[5, 6, 7, 8, P], [1, 2, 3, P, P], [4, 4, 4, 4, 4], [9, 1, P, P, P], [1, 2, 3, 4, P]])
    b = torch.tensor([[5, 6, 9, 8, P], [1, 2, 3, 4, P], [3, 4, 4, 4, 4], [9, 1, P, P, P], [1, 2, 3, 4, P]])
    a_len, b_len = torch.tensor([4, 3, 5, 2, 4]), torch.tensor([4, 4, 5, 2, 3])
    assert hsd.divergence_index(a, b, a_len, b_len).tolist() == [2, 3, 0, 2, 3]


def test_credit_mass_near_and_argmin_offset_hand_built():
    delta = torch.tensor([[0.5, -1.0, 0.0, -2.0, -1.0, 0.3, -4.0, 9.9],   # last token is padding
                          [0.1, 0.2, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0],      # no negative credit
                          [-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -3.0]])
    mask = torch.tensor([[1.0] * 7 + [0.0], [1.0] * 4 + [0.0] * 4, [1.0] * 8])
    d = torch.tensor([3, 1, 0])
    share = hsd.credit_mass_near(delta, mask, d, 1)
    torch.testing.assert_close(share, torch.tensor([3.0 / 8.0, 0.0, 0.25]))  # row 0: (-2-1)/(-1-2-1-4)
    torch.testing.assert_close(hsd.credit_mass_near(delta, mask, d, 3), torch.tensor([1.0, 0.0, 0.25]))
    assert hsd.argmin_offset(delta, mask, d).tolist() == [3, 1, 7]  # row 1: first minimum (t=2) - 1


def test_hsd_metrics_hand_built():
    # Group 0: rows 1 and 3 succeed (their credit must not count); group 1 fails entirely.
    correct = torch.tensor([0, 1, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    peers = torch.tensor([1, 3, 1, 1, -1, -1, -1, -1])
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 9, 9], [1, 7, 7, 7], [5, 5, 5, 5]] + [[0, 0, 0, 0]] * 4)
    credit = torch.zeros(8, 4)
    credit[0, 2], credit[2, 1], credit[2, 3], credit[1, 0], credit[3, 3] = -1.0, -1.0, -3.0, -5.0, -5.0
    m = hsd.hsd_metrics(correct, peers, 4, ids, torch.ones(8, 4), {"": credit, "_answer_only": torch.zeros(8, 4)}, 0)
    assert m["hsd/frac_rows_with_peer"] == 0.5 and m["hsd/frac_all_fail_groups"] == 0.5
    assert m["hsd/frac_rows_diagnosed"] == 0.25
    assert m["hsd/div_index_mean"] == pytest.approx((2 + 1) / 2)  # rows 0 and 2 against row 1
    assert m["hsd/credit_mass_near_div"] == pytest.approx((1 + 0.25) / 2)
    assert m["hsd/argmin_offset_mean"] == pytest.approx((0 + 2) / 2)
    assert m["hsd/credit_mass_near_div_answer_only"] == 0.0
    assert m["hsd/argmin_offset_mean_answer_only"] == pytest.approx((-2 - 1) / 2)  # no credit: argmin at t=0
    assert m["hsd/argmin_abs_offset_mean_answer_only"] == pytest.approx(1.5)
    none = hsd.hsd_metrics(torch.zeros(8, dtype=torch.bool), torch.full((8,), -1), 4, ids, torch.ones(8, 4),
                           {"": credit}, 8)
    assert "hsd/credit_mass_near_div" not in none and none["hsd/frac_all_fail_groups"] == 1.0


# ---------------------------------------------------------------------------------------------------
# End to end on the random tiny model: a stand-in verifier marks about half the rows correct, so
# groups have peers, single successes and all-fail groups.

FAST = ["--total-steps", "2", "--num-prompts", "4", "--group-size", "4", "--max-new-tokens", "16", "--eval-every", "0"]
HSD_KEYS = ["hsd/frac_rows_with_peer", "hsd/frac_all_fail_groups", "hsd/div_index_mean", "hsd/credit_mass_near_div",
            "hsd/credit_mass_near_div_answer_only", "hsd/argmin_offset_mean", "hsd/argmin_offset_mean_answer_only",
            "sd/pmi_seq_mean", "sd/frac_rows_distilled", "reward/mean"]


def coin_verify(example, completion):
    ok = zlib.crc32(completion.encode()) % 2 == 0
    return Verdict(float(ok), ok, "")


@pytest.fixture()
def captured(monkeypatch):
    """Record what hsd.main hands to the teacher and to the update, and verify with `coin_verify`."""
    calls = {"teacher": [], "update": [], "advantages": []}
    score, loss = hsd.score_teacher, hsd.policy_loss

    class Recording(hsd.Update):
        def __init__(self, run, args, batch, step, old_logprobs=None, token_masks=None):
            calls["update"].append((batch, token_masks))
            super().__init__(run, args, batch, step, old_logprobs, token_masks)

    monkeypatch.setattr(batch_module, "verify", coin_verify)
    monkeypatch.setattr(hsd, "score_teacher", lambda run, args, batch, messages, *a, **kw:
                        calls["teacher"].append((batch, [m.block for m in messages]))
                        or score(run, args, batch, messages, *a, **kw))
    monkeypatch.setattr(hsd, "Update", Recording)
    monkeypatch.setattr(hsd, "policy_loss", lambda mb, args, adv, *a:
                        calls["advantages"].append(adv) or loss(mb, args, adv, *a))
    return calls


def run_script(model, out, *extra):
    hsd.main(tyro.cli(hsd.Args, args=["--model", str(model), "--output-dir", str(out), *FAST, *extra]))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_peer_contexts_answer_only_diagnostics_and_all_metrics(tiny_model_dir, tmp_path, captured):
    rows = run_script(tiny_model_dir, tmp_path / "t", "--total-steps", "3", "--diagnostics-every", "2")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(k in rows[0] and k in rows[2] for k in HSD_KEYS)
    assert "hsd/credit_mass_near_div_answer_only" not in rows[1] and "hsd/credit_mass_near_div" in rows[1]
    assert len(captured["teacher"]) == 5  # 3 peer-conditioned passes + 2 answer-only passes
    for batch, blocks in [captured["teacher"][i] for i in (0, 2, 3)]:
        texts, seen_peer = batch.rollout.texts, False
        for i, block in enumerate(blocks):
            group = range(i // 4 * 4, i // 4 * 4 + 4)
            peers = [j for j in group if j != i and batch.verdicts[j].correct]
            if peers:
                assert any(block == hsd.hindsight_block(texts[j], batch.examples[i].answer) for j in peers)
                seen_peer = True
            else:
                assert block == hsd.answer_block(batch.examples[i])
        assert seen_peer
    _, answer_only = captured["teacher"][1]
    assert all(b.startswith("The correct final answer is: ") for b in answer_only)


def test_skip_leaves_successful_rows_out_of_the_distillation(tiny_model_dir, tmp_path, captured):
    rows = run_script(tiny_model_dir, tmp_path / "t", "--on-success", "skip", "--grpo-coef", "1", "--total-steps", "1")
    (batch, token_masks), adv = captured["update"][0], captured["advantages"][0]
    correct, mask = torch.tensor([v.correct for v in batch.verdicts]), batch.rollout.completion_mask.float()
    assert 0 < correct.sum() < len(correct)
    distill = token_masks["distill"]
    assert (distill[correct] == 0).all() and torch.equal(distill[~correct], mask[~correct])
    a = grpo.group_advantages(batch.rewards, 4, "group")
    assert torch.equal(adv, a[:, None].expand(-1, adv.shape[1]))  # the reward term: exactly A_i on every row
    assert rows[0]["sd/frac_rows_distilled"] == pytest.approx(1 - correct.float().mean().item())
    assert rows[0]["loss/distill"] > 0


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_full_vocabulary_kl_matches_a_naive_loop_and_its_gradient(direction, temperature):
    """The paired chunked path gives KL(S||T) (or KL(T||S)) per position; gradients reach only the student."""
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 5, 8, 29
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    student_h = torch.randn(B, T, H, generator=g, requires_grad=True)
    teacher_h = torch.randn(B, T, H, generator=g, requires_grad=True)
    y = torch.randint(0, V, (B, T), generator=g)
    out = token_stats(student_h, head, y, temperature, 3, paired_hidden=teacher_h, paired_head=head,
                      paired_fn=functools.partial(hsd.token_kl, direction=direction))
    naive = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            s = torch.softmax(head(student_h[b, t]).double() / temperature, -1)
            q = torch.softmax(head(teacher_h[b, t]).double() / temperature, -1)
            p_, r_ = (s, q) if direction == "reverse" else (q, s)
            naive[b, t] = sum(p_[v] * (torch.log(p_[v]) - torch.log(r_[v])) for v in range(V))
    torch.testing.assert_close(out["paired"].double(), naive, atol=1e-5, rtol=1e-5)
    out["paired"].sum().backward()
    grad, student_h.grad = student_h.grad, None
    naive.sum().backward()
    torch.testing.assert_close(grad, student_h.grad, atol=1e-5, rtol=1e-4)
    assert teacher_h.grad.abs().sum() > 0  # the naive loop's backward reached the teacher: the chunked one did not
    teacher_h.grad = None
    token_stats(student_h, head, y, temperature, 3, paired_hidden=teacher_h, paired_head=head,
                paired_fn=functools.partial(hsd.token_kl, direction=direction))["paired"].sum().backward()
    assert teacher_h.grad is None


def test_paper_recipe_distils_with_a_full_kl_and_no_grpo_term(tiny_model_dir, tmp_path, captured):
    rows = run_script(tiny_model_dir, tmp_path / "k", "--total-steps", "3")  # the defaults: grpo-coef 0, beta 0.001
    assert all(r["loss/distill"] > 0 and "loss/kl" in r for r in rows)
    assert all((adv == 0).all() for adv in captured["advantages"])  # no GRPO advantage anywhere
    # Diagnostics with the answer-only teacher every 10 steps: here at step 0 only; 3 peer passes + 1 answer-only.
    assert ["hsd/abs_credit_near_div_answer_only" in r for r in rows] == [True, False, False]
    assert len(captured["teacher"]) == 4
    forward = run_script(tiny_model_dir, tmp_path / "f", "--total-steps", "1", "--kl-direction", "forward")
    assert forward[0]["reward/mean"] == rows[0]["reward/mean"] and forward[0]["loss/distill"] != rows[0]["loss/distill"]


def test_kl_with_the_current_teacher_needs_one_update_per_batch():
    with pytest.raises(ArgError, match="one update per batch"):
        hsd.Args(num_minibatches=2)
    assert hsd.Args(num_minibatches=2, teacher="initial").teacher == "initial"  # a frozen teacher's head may stay


def test_abs_credit_near_divergence_by_hand():
    delta = torch.tensor([[1.0, -2.0, 0.0, 3.0, -4.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    share = hsd.abs_credit_near(delta, mask, torch.tensor([1, 2]), 1)
    torch.testing.assert_close(share, torch.tensor([(1 + 2 + 0) / 6, 0.0]))  # the masked -4 never counts


def test_teacher_message_wording_and_the_instruction_flag_reach_every_teacher_pass(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    """HSD's wording is the project's choice: `{problem}\n\n{block}\n\n{instruction}`; --teacher-instruction "" drops
    the last line from the peer and the answer-only passes alike."""
    ex = Example("Compute 12+34.", "46")
    assert hsd.hsd_message(ex, "B", "Do it.").text == "Compute 12+34.\n\nB\n\nDo it."
    assert hsd.hsd_message(ex, "B", "").text == "Compute 12+34.\n\nB"
    tails, score = [], hsd.score_teacher
    monkeypatch.setattr(hsd, "score_teacher", lambda run, args, batch, messages, *a, **kw:
                        tails.append({m.tail for m in messages}) or score(run, args, batch, messages, *a, **kw))
    run_script(tiny_model_dir, tmp_path / "n", "--teacher-instruction", "", "--diagnostics-every", "1")
    assert len(tails) == 4 and all(t == {""} for t in tails)
    tails.clear()
    run_script(tiny_model_dir, tmp_path / "d", "--total-steps", "1")
    assert tails and all(t == {"\n\nNow solve the original problem step by step."} for t in tails)

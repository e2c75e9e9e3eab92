"""credit.py: lam=0 == sd.py --preset sdpo, SDPO's context and masking, the target Q vs a naive vocabulary loop,
the contrast after other problems, the derangement."""
import math
import zlib
from types import SimpleNamespace

import pytest
import torch
from test_sd import run_script

import credit
import sd
from common import batch as batch_module
from common.args import ArgError
from common.batch import Batch, score_rollout
from common.dist import Dist
from common.example import Example
from common.logprobs import score_completions, token_stats
from common.prompts import render_prompts
from common.rollout import generate
from common.teacher import score_teacher
from common.verifiers import Verdict

PROBLEMS = ["Compute 12+34.", "Compute 5+67+8+9.", "Compute 1+2."]
G = 2


@torch.no_grad()
def toy_batch(policy, tokenizer, seed=0):
    """A rollout of G completions for each of PROBLEMS, as the training loop's Batch, plus SDPO's contexts z_i
    (rows 1, 3, 5 succeed: every row but those has a peer; the successes have none)."""
    torch.manual_seed(seed)
    r = generate(policy, tokenizer, render_prompts(tokenizer, PROBLEMS), G, 12)
    examples = [Example(p, str(i)) for i, p in enumerate(PROBLEMS) for _ in range(G)]
    verdicts = [Verdict(float(i % 2), bool(i % 2), "") for i in range(len(examples))]
    batch = Batch(r, examples, verdicts, torch.tensor([v.reward for v in verdicts]), len(PROBLEMS))
    return batch, credit.sdpo_contexts(batch, G, True)


def fake_run(policy, tokenizer, args):
    """The fields of a Run that rollout and teacher scoring read."""
    return SimpleNamespace(args=args, tokenizer=tokenizer, d=Dist(), policy=policy, teacher_model=policy)


def test_partners_are_a_seeded_derangement_over_groups():
    P, K = 5, 3
    partners = credit.contrast_partners(P, G, K, (1, 0, 7))
    assert partners.shape == (P * G, K) and partners.dtype == torch.long
    own = torch.arange(P).repeat_interleave(G)
    assert (partners != own[:, None]).all()  # never the row's own prompt group
    assert all(len(set(row.tolist())) == K for row in partners)  # K distinct partners when K <= P-1
    assert (partners.view(P, G, K) == partners.view(P, G, K)[:, :1]).all()  # a group's rows share partners
    for k in range(K):  # each k is a permutation of the groups
        assert sorted(partners[::G, k].tolist()) == list(range(P))
    assert torch.equal(partners, credit.contrast_partners(P, G, K, (1, 0, 7)))
    draws = {tuple(credit.contrast_partners(P, G, 1, (seed, 0, step))[::G, 0].tolist())
             for seed in (1, 2) for step in range(4)}
    assert len(draws) > 1
    # K > P-1 cycles through the other groups again, still never the own one.
    assert (credit.contrast_partners(2, 3, 4, 0) == (1 - torch.arange(2)).repeat_interleave(3)[:, None]).all()


def test_one_prompt_per_rank_fails_clearly():
    with pytest.raises(ArgError, match="--num-prompts must be >= 2 .*each of the 1 rank"):
        credit.Args(num_prompts=1)


def naive_credit_loss(s_logits, t_logits, g_logits, k, weight):
    """KL(S || Q) per position by explicit loops over the vocabulary: Q ∝ T exp(-lam G) on S's top-k + tail."""
    out = torch.zeros(s_logits.shape[:2], dtype=torch.float64)
    for b in range(s_logits.shape[0]):
        for t in range(s_logits.shape[1]):
            S, T = torch.softmax(s_logits[b, t].double(), -1), torch.softmax(t_logits[b, t].double(), -1)
            Gs = [torch.softmax(g[b, t].double(), -1) for g in g_logits]
            top = sorted(range(len(S)), key=lambda v: -S[v].item())[:k]
            s_b, t_b = [S[v].item() for v in top], [T[v].item() for v in top]
            s_b.append(1 - sum(s_b))
            t_b.append(1 - sum(t_b))
            g_log = [sum(math.log(G[v].item()) for G in Gs) / len(Gs) for v in top]
            g_log.append(sum(math.log(1 - sum(G[v].item() for v in top)) for G in Gs) / len(Gs))
            q = [math.exp(math.log(tj) - weight * gj) for tj, gj in zip(t_b, g_log)]
            q = [x / sum(q) for x in q]
            out[b, t] = sum(sj * (math.log(sj) - math.log(qj)) for sj, qj in zip(s_b, q))
    return out


@pytest.mark.parametrize("weight", [0.0, 0.1, 0.7])
def test_contrastive_target_loss_matches_naive_vocabulary_loop(weight):
    g = torch.Generator().manual_seed(1)
    B, T, H, V, k, C = 2, 4, 8, 23, 5, 2
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    s_h, t_h = torch.randn(B, T, H, generator=g, requires_grad=True), torch.randn(B, T, H, generator=g)
    g_h = [torch.randn(B, T, H, generator=g) for _ in range(C)]
    y = torch.randint(0, V, (B, T), generator=g)
    index = token_stats(s_h.detach(), head, y, 1.0, 4, topk=k)["topk_index"]  # the student's top-k (SDPO)
    teacher = token_stats(t_h, head, y, 1.0, 3, gather_index=index)
    contrast = torch.stack([token_stats(h, head, y, 1.0, 5, gather_index=index)["gathered"] for h in g_h], dim=1)
    student = token_stats(s_h, head, y, 1.0, 2, gather_index=index)["gathered"]
    target = credit.contrastive_target(teacher["gathered"], contrast, weight)
    loss = credit.generalized_jsd(student, target.detach(), 1.0)
    with torch.no_grad():
        want = naive_credit_loss(head(s_h), head(t_h), [head(h) for h in g_h], k, weight)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-4)  # fp32 against a float64 loop
    assert torch.allclose(target.exp().sum(-1), torch.ones(B, T), atol=1e-5)  # Q is a distribution over k + 1 buckets
    loss.sum().backward()
    assert s_h.grad is not None and s_h.grad.abs().sum() > 0  # gradient reaches the student only


@torch.no_grad()
def test_the_contrast_swaps_only_the_problem_and_one_call_matches_separate_unpadded_rows(policy, tokenizer):
    """The teacher and its contrasts in one scoring call: row i's completion and SDPO context z_i after another
    group's problem, at the student's top-k; each value equals a lone, unpadded forward of that message."""
    batch, contexts = toy_batch(policy, tokenizer, seed=3)
    args = credit.Args(group_size=G, micro_batch_rows=5, logprob_chunk=6, topk=4)
    run = fake_run(policy, tokenizer, args)
    old = score_rollout(run, args, batch, with_entropy=True, topk=args.topk)
    partners = credit.contrast_partners(len(PROBLEMS), G, 2, (1, 0, 0))
    rows = [0, 2, 4]  # the rows with a peer (the others succeeded alone in their group)
    assert [c != (None, None) for c in contexts] == [True, False] * 3
    own, problems = list(range(6)), [G * int(partners[i, k]) for k in range(2) for i in rows]
    index = old["topk_index"][own + rows * 2]
    merged = credit.score_with_problems(run, args, batch, contexts, own + rows * 2, own + problems, index)
    messages = [credit.sdpo_message(e.prompt, *c) for e, c in zip(batch.examples, contexts)]
    alone = score_teacher(run, args, batch, messages, args.max_teacher_prompt_tokens, gather_index=old["topk_index"])
    mask = batch.rollout.completion_mask.float()
    torch.testing.assert_close(merged["logprobs"][:6], alone["logprobs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(merged["gathered"][:6], alone["gathered"], atol=1e-5, rtol=0)
    r = batch.rollout
    for j, (i, q) in enumerate(zip(rows * 2, problems)):
        assert q // G != i // G  # never the row's own problem
        message = credit.sdpo_message(PROBLEMS[q // G], *contexts[i])
        assert message.text == (f"{PROBLEMS[q // G]}\nCorrect solution:\n\n{r.texts[i + 1]}\n\n"
                                "Correctly solve the original question.")
        n = int(mask[i].sum())
        p = torch.tensor(tokenizer(render_prompts(tokenizer, [message.text])[0],
                                   add_special_tokens=False).input_ids)[None]
        y = r.completion_ids[i, :n][None]
        want = score_completions(policy, p, torch.ones_like(p), y, torch.ones_like(y), 1.0, 1024, 1,
                                 gather_index=old["topk_index"][i, :n][None])
        torch.testing.assert_close(merged["logprobs"][6 + j, :n], want["logprobs"][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(merged["gathered"][6 + j, :n], want["gathered"][0], atol=1e-5, rtol=0)


def coin_verify(example, completion):
    ok = zlib.crc32(completion.encode()) % 2 == 0
    return Verdict(float(ok), ok, "")


SDPO = ["--preset", "sdpo", "--ema-rate", "0.01", "--jsd-alpha", "1", "--topk", "20"]


def test_weight_zero_reproduces_sdpo_bit_for_bit(tiny_model_dir, tmp_path, monkeypatch):
    """CREDIT at lam = 0 is sd.py's SDPO preset with CREDIT's EMA rate, reverse KL and top-20, float for float."""
    monkeypatch.setattr(batch_module, "verify", coin_verify)  # about half the rows succeed: peers to distil toward
    s = run_script(sd, tiny_model_dir, tmp_path / "s", *SDPO)
    c = run_script(credit, tiny_model_dir, tmp_path / "c", "--contrast-weight", "0")
    assert len(s) == len(c) == 3 and all(0 < r["sd/frac_rows_distilled"] < 1 and r["loss/distill"] > 0 for r in c)
    for a, b in zip(s, c):
        shared = [k for k in a if not k.startswith("perf/")]
        assert {k: a[k] for k in shared} == {k: b[k] for k in shared}
        assert b["credit/contrast_mean"] == 0 and b["credit/sign_flip_frac"] == 0
        assert -1 <= b["credit/corr_teacher_contrast"] <= 1
    # The contrast moves the target: the same first rollout, a different update.
    moved = run_script(credit, tiny_model_dir, tmp_path / "m")
    assert moved[0]["reward/mean"] == c[0]["reward/mean"] and moved[0]["loss/distill"] != c[0]["loss/distill"]
    assert moved[0]["credit/contrast_mean"] < 0 and 0 <= moved[0]["credit/sign_flip_frac"] < 1


def test_rows_without_a_peer_get_no_contrast_pass_and_no_loss(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(batch_module, "verify", coin_verify)
    seen, score = [], credit.score_teacher

    class Recording(credit.Update):
        def __init__(self, run, args, batch, step, old_logprobs=None, token_masks=None):
            seen.append((batch, token_masks["distill"], []))
            super().__init__(run, args, batch, step, old_logprobs, token_masks)

    monkeypatch.setattr(credit, "Update", Recording)
    monkeypatch.setattr(credit, "score_teacher", lambda run, args, batch, messages, cap, rows, *a, **kw:
                        seen[-1][2].append(rows) or score(run, args, batch, messages, cap, rows, *a, **kw))
    run_script(credit, tiny_model_dir, tmp_path / "c", "--total-steps", "2", "--eval-every", "0",
               "--micro-batch-rows", "5")
    for step, (batch, distill, calls) in enumerate(seen):
        ok = torch.tensor([v.correct for v in batch.verdicts]).view(-1, 4)
        has_peer = (ok.sum(1, keepdim=True) - ok.long() > 0).reshape(-1)
        assert torch.equal(distill, batch.rollout.completion_mask.float() * has_peer[:, None])
        # One call per micro-batch (inside the update): its rows' teachers, then its distilled rows' contrasts.
        chunks = [list(range(i, min(i + 5, len(has_peer)))) for i in range(0, len(has_peer), 5)]
        assert calls == [rows + [i for i in rows if has_peer[i]] for rows in chunks]



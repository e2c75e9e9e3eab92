"""credit.py: lam=0 == sd.py in both forms, the target Q vs a naive vocabulary loop, self-partners, the derangement."""
from types import SimpleNamespace

import math

import pytest
import torch
import tyro

import credit
import grpo
import sd
from common.example import Example
from common.batch import Batch, score_rollout
from common.dist import Dist
from common.logprobs import score_completions, token_stats
from common.prompts import render_prompts
from common.rollout import generate
from common.teacher import score_teacher, teacher_prompt
from common.verifiers import Verdict
from test_sd import run_script

PROBLEMS = ["Compute 12+34.", "Compute 5+67+8+9.", "Compute 1+2."]
G = 2


@torch.no_grad()
def toy_batch(policy, tokenizer, seed=0):
    """A rollout of G completions for each of PROBLEMS, as the training loop's Batch, plus z_i blocks."""
    torch.manual_seed(seed)
    r = generate(policy, tokenizer, render_prompts(tokenizer, PROBLEMS), G, 12)
    examples = [Example(p, str(i)) for i, p in enumerate(PROBLEMS) for _ in range(G)]
    verdicts = [Verdict(float(i % 2), bool(i % 2), "") for i in range(len(examples))]
    batch = Batch(r, examples, verdicts, torch.tensor([v.reward for v in verdicts]), len(PROBLEMS))
    blocks = [credit.privileged_block(e, v, "answer", True) for e, v in zip(examples, verdicts)]
    return batch, blocks


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
    draws = {tuple(credit.contrast_partners(P, G, 1, (seed, 0, step))[::G, 0].tolist()) for seed in (1, 2) for step in range(4)}
    assert len(draws) > 1
    # K > P-1 cycles through the other groups again, still never the own one.
    assert (credit.contrast_partners(2, 3, 4, 0) == (1 - torch.arange(2)).repeat_interleave(3)[:, None]).all()


def test_one_prompt_per_rank_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="raise --num-prompts"):
        credit.contrast_partners(1, 8, 1, 0)
    args = tyro.cli(credit.Args, args=["--num-prompts", "1", "--output-dir", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="raise --num-prompts"):
        credit.main(args)
    assert not (tmp_path / "r").exists()  # nothing written


def test_k_partners_average_in_log_space():
    g = torch.Generator().manual_seed(0)
    K, B, T, alpha = 3, 4, 5, 0.7
    t, s = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    c = torch.randn(K, B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    got = credit.contrastive_credit(t, c, s, alpha, mask)
    for b in range(B):
        for i in range(T):
            mean_log = sum(c[k, b, i].item() for k in range(K)) / K
            want = (t[b, i].item() - alpha * mean_log - s[b, i].item()) * mask[b, i].item()
            assert got[b, i].item() == pytest.approx(want, abs=1e-6)
    assert torch.equal(credit.contrastive_credit(t, c, s, 0.0, mask), sd.token_credit(t, s, mask))  # bitwise


@torch.no_grad()
def test_own_prompt_as_partner_cancels_teacher_at_weight_one(policy, tokenizer):
    batch, blocks = toy_batch(policy, tokenizer)
    args = credit.Args(group_size=G, micro_batch_rows=4, logprob_chunk=7)  # micro-batches mix rows differently per pass
    run = fake_run(policy, tokenizer, args)
    old = score_rollout(run, batch, with_entropy=True)
    teacher = score_teacher(run, batch, blocks, args.max_teacher_prompt_tokens)
    own = torch.arange(len(PROBLEMS)).repeat_interleave(G)[:, None].repeat(1, 2)
    contrast = credit.score_with_problems(run, args, batch, blocks, own)["logprobs"]
    mask = batch.rollout.completion_mask.float()
    delta = credit.contrastive_credit(teacher["logprobs"], contrast, old["logprobs"], 1.0, mask)
    torch.testing.assert_close(delta, -old["logprobs"] * mask, atol=1e-5, rtol=0)
    assert (old["logprobs"] * mask).abs().sum() > 1  # the check is not vacuous


@torch.no_grad()
def test_naive_per_row_per_partner_loop_matches_batched_credit(policy, tokenizer):
    batch, blocks = toy_batch(policy, tokenizer, seed=3)
    args = credit.Args(group_size=G, micro_batch_rows=5, logprob_chunk=6, num_contrast=2)
    run = fake_run(policy, tokenizer, args)
    partners = credit.contrast_partners(len(PROBLEMS), G, 2, (1, 0, 0))
    old = score_rollout(run, batch, with_entropy=True)
    teacher = score_teacher(run, batch, blocks, args.max_teacher_prompt_tokens)
    r, mask = batch.rollout, batch.rollout.completion_mask.float()
    got = credit.contrastive_credit(teacher["logprobs"], credit.score_with_problems(run, args, batch, blocks, partners)["logprobs"],
                                    old["logprobs"], 0.5, mask)

    def row_logprobs(prompt_text, y):
        """log p(y_t | prompt, y_<t) from one unpadded row."""
        p = torch.tensor(tokenizer(prompt_text, add_special_tokens=False).input_ids)[None]
        return score_completions(policy, p, torch.ones_like(p), y[None], torch.ones_like(y)[None], 1.0, 1024, 1)["logprobs"][0]

    for i in range(r.completion_ids.shape[0]):
        y = r.completion_ids[i][r.completion_mask[i].bool()]
        s = row_logprobs(render_prompts(tokenizer, [PROBLEMS[i // G]])[0], y)
        t = row_logprobs(render_prompts(tokenizer, [teacher_prompt(PROBLEMS[i // G], blocks[i])])[0], y)
        c = [row_logprobs(render_prompts(tokenizer, [teacher_prompt(PROBLEMS[g], blocks[i])])[0], y)
             for g in partners[i].tolist()]
        assert partners[i].tolist() != [i // G] * 2
        for j in range(len(y)):
            want = t[j].item() - 0.5 * (c[0][j].item() + c[1][j].item()) / 2 - s[j].item()
            assert got[i, j].item() == pytest.approx(want, abs=1e-5)
        assert (got[i, len(y):] == 0).all()


TOKEN_FORM = ["--sd-loss", "token", "--grpo-coef", "1", "--teacher", "current"]


def test_weight_zero_reproduces_sd_in_the_grpo_frame(tiny_model_dir, tmp_path):
    s = run_script(sd, tiny_model_dir, tmp_path / "s", "--sd-loss", "token")
    c = run_script(credit, tiny_model_dir, tmp_path / "c", *TOKEN_FORM, "--contrast-weight", "0", "--num-contrast", "2")
    assert len(s) == len(c) == 3
    for a, b in zip(s, c):
        shared = [k for k in a if not k.startswith("perf/")]
        assert {k: a[k] for k in shared} == {k: b[k] for k in shared}
        assert b["credit/contrast_mean"] == 0 and b["credit/sign_flip_frac"] == 0
        assert b["credit/input_specific_mean"] == pytest.approx(b["sd/teacher_logp_mean"], abs=1e-6)
        assert -1 <= b["credit/corr_teacher_contrast"] <= 1


def test_weight_zero_reproduces_sdpo_distillation(tiny_model_dir, tmp_path):
    """The paper's recipe at lam = 0 is SDPO's loss: sd.py's logit mode on the teacher's top-k, reverse KL, EMA 0.01."""
    s = run_script(sd, tiny_model_dir, tmp_path / "s", "--sd-loss", "logit", "--topk-from", "teacher", "--jsd-alpha", "1",
                   "--topk", "20", "--grpo-coef", "0", "--teacher", "ema", "--ema-rate", "0.01")
    c = run_script(credit, tiny_model_dir, tmp_path / "c", "--contrast-weight", "0")
    assert len(s) == len(c) == 3 and all(r["loss/distill"] > 0 for r in c)
    for a, b in zip(s, c):
        shared = [k for k in a if not k.startswith("perf/")]
        assert {k: a[k] for k in shared} == {k: b[k] for k in shared}
    # The contrast moves the target: the same first rollout, a different update.
    moved = run_script(credit, tiny_model_dir, tmp_path / "m")
    assert moved[0]["reward/mean"] == c[0]["reward/mean"] and moved[0]["loss/distill"] != c[0]["loss/distill"]
    assert moved[0]["credit/contrast_mean"] < 0


def test_token_form_runs_and_flips_some_signs(tiny_model_dir, tmp_path):
    rows = run_script(credit, tiny_model_dir, tmp_path / "c", *TOKEN_FORM, "--contrast-weight", "0.5", "--total-steps", "1",
                      "--eval-every", "0")
    m = rows[0]
    assert m["credit/contrast_mean"] < 0 and 0 < m["credit/sign_flip_frac"] < 1
    assert m["credit/input_specific_mean"] == pytest.approx(m["sd/teacher_logp_mean"] - m["credit/contrast_mean"], abs=1e-5)


def naive_credit_loss(s_logits, t_logits, g_logits, k, weight):
    """KL(S || Q) per position by explicit loops over the vocabulary: Q ∝ T exp(-lam G) on T's top-k + tail."""
    out = torch.zeros(s_logits.shape[:2], dtype=torch.float64)
    for b in range(s_logits.shape[0]):
        for t in range(s_logits.shape[1]):
            S, T = torch.softmax(s_logits[b, t].double(), -1), torch.softmax(t_logits[b, t].double(), -1)
            Gs = [torch.softmax(g[b, t].double(), -1) for g in g_logits]
            top = sorted(range(len(T)), key=lambda v: -T[v].item())[:k]
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
    teacher = token_stats(t_h, head, y, 1.0, 3, topk=k, gather_topk=True)
    contrast = torch.stack([token_stats(h, head, y, 1.0, 5, gather_index=teacher["topk_index"])["gathered"] for h in g_h])
    student = token_stats(s_h, head, y, 1.0, 2, gather_index=teacher["topk_index"])["gathered"]
    target = credit.contrastive_target(teacher["gathered"], contrast, weight)
    loss = credit.generalized_jsd(student, target.detach(), 1.0)
    with torch.no_grad():
        want = naive_credit_loss(head(s_h), head(t_h), [head(h) for h in g_h], k, weight)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-4)  # fp32 against a float64 loop
    assert torch.allclose(target.exp().sum(-1), torch.ones(B, T), atol=1e-5)  # Q is a distribution over k + 1 buckets
    loss.sum().backward()
    assert s_h.grad is not None and s_h.grad.abs().sum() > 0  # gradient reaches the student only


@torch.no_grad()
def test_main_and_contrast_passes_in_one_call_match_separate_calls(policy, tokenizer):
    """Token form, lam > 0: t(x_i, z_i) and the K contrasts in one call: same values as sd.py's pass, up to padding."""
    batch, blocks = toy_batch(policy, tokenizer, seed=5)
    args = credit.Args(group_size=G, micro_batch_rows=4, num_contrast=2)
    run = fake_run(policy, tokenizer, args)
    partners = credit.contrast_partners(len(PROBLEMS), G, 2, (1, 0, 2))
    own = torch.arange(len(PROBLEMS)).repeat_interleave(G)[:, None]
    merged = credit.score_with_problems(run, args, batch, blocks, torch.cat([own, partners], 1))
    alone = score_teacher(run, batch, blocks, args.max_teacher_prompt_tokens)
    mask = batch.rollout.completion_mask.float()
    torch.testing.assert_close(merged["logprobs"][0] * mask, alone["logprobs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(merged["logprobs"][1:], credit.score_with_problems(run, args, batch, blocks, partners)["logprobs"],
                               atol=1e-5, rtol=0)
    assert torch.equal(merged["prompt_len"][0], alone["prompt_len"]) and merged["shortened"].shape == (3, len(mask))

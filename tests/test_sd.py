"""sd.py: the published teacher contexts, SDPO's masking, the pMI identity, lam=0 == grpo, the generalized JSD, EMA."""
import functools
import json
import math
import zlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import tyro

import grpo
import sd
from common import batch as batch_module
from common import teacher as teacher_module
from common import tracking
from common.args import apply_preset
from common.example import Example
from common.logprobs import score_completions, token_stats
from common.prompts import render_prompts, tokenize_left
from common.rollout import generate
from common.teacher import TeacherMessage, teacher_inputs
from common.update import MicroBatch
from common.verifiers import Verdict

PROBLEMS = ["Compute 12+34.", "Compute 5+67+8.", "Compute 1+2."]


def seq_logprob(policy, tokenizer, prompt_text, completion_ids):
    """log p(y | prompt) from one unpadded full-sequence forward pass."""
    p = tokenizer(prompt_text, add_special_tokens=False).input_ids
    ids = torch.tensor(p + completion_ids)[None]
    logp = F.log_softmax(policy.lm(input_ids=ids).logits[0].float(), -1)
    return sum(logp[len(p) - 1 + i, tok].item() for i, tok in enumerate(completion_ids))


@torch.no_grad()
def test_summed_credit_equals_pmi(policy, tokenizer):
    torch.manual_seed(0)
    prompts = render_prompts(tokenizer, PROBLEMS)
    r = generate(policy, tokenizer, prompts, 2, 12, temperature=1.0)
    old = score_completions(policy, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 1.0, 7, 4)
    problems = [p for p in PROBLEMS for _ in range(2)]
    messages = [TeacherMessage(f"{p}\n\n", f"The correct final answer is: {i}" * (1 + i % 3), "\n\nSolve it.")
                for i, p in enumerate(problems)]
    ids, mask, _ = teacher_inputs(tokenizer, messages, 10_000, torch.device("cpu"))
    t = score_completions(policy, ids, mask, r.completion_ids, r.completion_mask, 1.0, 5, 3)
    u = sd.token_credit(t["logprobs"], old["logprobs"], r.completion_mask.float())
    for i in range(6):
        y = r.completion_ids[i][r.completion_mask[i].bool()].tolist()
        student = seq_logprob(policy, tokenizer, prompts[i // 2], y)
        teacher = seq_logprob(policy, tokenizer, render_prompts(tokenizer, [messages[i].text])[0], y)
        assert u[i].sum().item() == pytest.approx(teacher - student, abs=1e-4)


@torch.no_grad()
def test_teacher_equal_to_student_prompt_gives_zero_credit(policy, tokenizer):
    torch.manual_seed(1)
    prompts = render_prompts(tokenizer, PROBLEMS)
    r = generate(policy, tokenizer, prompts, 2, 10)
    old = score_completions(policy, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 0.8, 4, 6)
    # Re-tokenize the same prompts with a much longer row in the batch: different left padding.
    long = render_prompts(tokenizer, ["x" * 80])[0]
    ids, mask = tokenize_left(tokenizer, [p for p in prompts for _ in range(2)] + [long], torch.device("cpu"))
    pad = torch.full((1, r.completion_ids.shape[1]), tokenizer.pad_token_id)
    t = score_completions(policy, ids, mask, torch.cat([r.completion_ids, pad]),
                          torch.cat([r.completion_mask, torch.zeros_like(pad)]), 0.8, 3, 2)
    assert ids.shape[1] > r.prompt_ids.shape[1]
    u = sd.token_credit(t["logprobs"][:6], old["logprobs"], r.completion_mask.float())
    assert u.abs().max().item() < 1e-5


def naive_jsd(p_s, p_t, alpha):
    """Full-distribution generalized JSD with explicit sums."""
    def kl(p, q):
        return sum(pi * (torch.log(pi) - torch.log(qi)) for pi, qi in zip(p, q) if pi > 0)
    if alpha == 0:
        return kl(p_t, p_s)
    if alpha == 1:
        return kl(p_s, p_t)
    m = (1 - alpha) * p_s + alpha * p_t
    return (1 - alpha) * kl(p_s, m) + alpha * kl(p_t, m)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.3])
def test_generalized_jsd_full_vocab_matches_naive(alpha):
    g = torch.Generator().manual_seed(0)
    s = F.log_softmax(torch.randn(3, 11, generator=g, dtype=torch.float64), -1)
    t = F.log_softmax(torch.randn(3, 11, generator=g, dtype=torch.float64), -1)
    got = sd.generalized_jsd(s, t, alpha)
    for i in range(3):
        assert got[i].item() == pytest.approx(naive_jsd(s[i].exp(), t[i].exp(), alpha).item(), abs=1e-10)
    assert (got >= -1e-12).all() and sd.generalized_jsd(s, s, alpha).abs().max() < 1e-12


def test_topk_with_tail_matches_definition_and_grads_only_student():
    g = torch.Generator().manual_seed(1)
    s_logits = torch.randn(2, 20, generator=g, requires_grad=True)
    t_logits = torch.randn(2, 20, generator=g, requires_grad=True)
    k = 5
    s, t = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
    idx = s.detach().topk(k, -1).indices
    def buckets(logp):  # k top-k log-probs, then log of the remaining mass
        top = logp.gather(-1, idx)
        return torch.cat([top, torch.log(1 - top.exp().sum(-1, keepdim=True))], -1)
    loss = sd.generalized_jsd(buckets(s), buckets(t).detach(), 0.5)
    bs, bt = buckets(s).detach().exp().double(), buckets(t).detach().exp().double()
    for i in range(2):
        assert loss[i].item() == pytest.approx(naive_jsd(bs[i], bt[i], 0.5).item(), abs=1e-6)
    loss.sum().backward()
    assert s_logits.grad is not None and s_logits.grad.abs().sum() > 0 and t_logits.grad is None


def test_ema_update_math():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in a.parameters()]
    sd.ema_update(a, b, 0.05)
    for p, p0, q in zip(a.parameters(), before, b.parameters()):
        torch.testing.assert_close(p, 0.95 * p0 + 0.05 * q)


def test_long_teacher_prompt_is_shortened_in_the_middle(tokenizer):
    block = "HEAD " + "m" * 500 + " TAIL"
    messages = [sd.antisd_message(Example("Compute 1+2.", "3"), Verdict(0.0, False, ""), block),
                sd.antisd_message(Example("Compute 3+4.", "7"), Verdict(0.0, False, ""), "short")]
    ids, mask, shortened = teacher_inputs(tokenizer, messages, 160, torch.device("cpu"))
    assert shortened.tolist() == [True, False] and mask.sum(-1).max().item() <= 160
    text = tokenizer.decode(ids[0][mask[0].bool()])
    assert "Compute 1+2.\n\nYour previous attempt:\nHEAD" in text and "TAIL" in text and "[...]" in text
    assert "TAIL\n\nPrevious assessment: Your answer is incorrect.\nNow solve this problem step by step." in text
    assert tokenizer.decode(ids[1][mask[1].bool()]) == render_prompts(tokenizer, [messages[1].text])[0]
    # A limit below the problem + instruction alone leaves them intact rather than failing.
    ids, mask, _ = teacher_inputs(tokenizer, messages[:1], 10, torch.device("cpu"))
    assert "Compute 1+2." in tokenizer.decode(ids[0][mask[0].bool()])


FAST = ["--total-steps", "3", "--num-prompts", "4", "--group-size", "4", "--max-new-tokens", "20",
        "--eval-every", "2", "--eval-size", "8"]


def run_script(module, model, out, *extra):
    module.main(tyro.cli(module.Args, args=["--model", str(model), "--output-dir", str(out), *FAST, *extra]))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lam_zero_reproduces_grpo(tiny_model_dir, tmp_path):
    g = run_script(grpo, tiny_model_dir, tmp_path / "g")
    s = run_script(sd, tiny_model_dir, tmp_path / "s", "--lam", "0")
    assert len(g) == len(s) == 3
    for a, b in zip(g, s):
        shared = [k for k in a if not k.startswith("perf/")]
        assert {k: a[k] for k in shared} == {k: b[k] for k in shared}
        assert "sd/pmi_seq_mean" in b


def test_logit_mode_and_ema_resume(tiny_model_dir, tmp_path, monkeypatch):
    rows = run_script(sd, tiny_model_dir, tmp_path / "l", "--sd-loss", "logit", "--topk", "8", "--teacher", "ema")
    assert all(r["loss/distill"] >= 0 for r in rows) and any(r["loss/distill"] > 0 for r in rows)
    state = torch.load(tmp_path / "l" / "checkpoint" / "state.pt", weights_only=False)
    policy_w = state["model"]["lm.model.layers.0.mlp.up_proj.weight"]
    teacher_w = state["teacher"]["lm.model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(policy_w, teacher_w)  # the EMA lags the policy
    # Resume: the restored teacher equals the saved one.
    from common import checkpoint
    from common.run import setup

    args = sd.Args(model=str(tiny_model_dir), output_dir=str(tmp_path / "l"), resume=True, teacher="ema", total_steps=3)
    run = setup(args, "sd", teacher_weights="ema")
    assert run.start_step == 3
    torch.testing.assert_close(run.teacher.lm.model.layers[0].mlp.up_proj.weight, teacher_w)
    assert checkpoint.find(tmp_path / "l") is not None


# ---------------------------------------------------------------------------------------------------
# The published teacher contexts, character for character. The templates below are transcribed from the
# sources, not from sd.py: lasgroup/SDPO@0e6d510 verl/trainer/config/actor/actor.yaml (its `|-` blocks as a
# YAML loader reads them) and the message builder of verl/trainer/ppo/ray_trainer.py
# (_build_teacher_message); siyan-zhao/OPSD@590ec26 data_collator.py with reason_first=False; the AntiSD
# paper's Appendix C.

SDPO_REPROMPT = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
SDPO_SOLUTION = "\nCorrect solution:\n\n{successful_previous_attempt}"
SDPO_FEEDBACK = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}"
OPSD_TRANSITION = ("\n\nAfter understanding the reference solution and the rationale behind each step, now articulate "
                   "your own step-by-step reasoning that derives the same final answer to the problem below:\n")
ANTISD = ("{prompt}\n\nYour previous attempt:\n{solution}\n\nPrevious assessment: {feedback}\n"
          "Now solve this problem step by step.")


def sdpo_reference(prompt, solution, feedback):
    """SDPO's _build_teacher_message with environment_feedback_only_without_solution=True."""
    use_feedback = feedback is not None and solution is None
    if not (use_feedback or solution is not None):
        return prompt
    return SDPO_REPROMPT.format(
        prompt=prompt,
        solution=SDPO_SOLUTION.format(successful_previous_attempt=solution) if solution is not None else "",
        feedback=SDPO_FEEDBACK.format(feedback_raw=feedback) if use_feedback else "")


def opsd_reference(problem, solution):
    """OPSD's teacher_user_message (data_collator.py, reason_first=False)."""
    return (f"{problem}\n\n"
            f"Here is a reference solution to this problem:\n{solution}\n"
            f"{OPSD_TRANSITION}\n"
            f"Please reason step by step, and put your final answer within \\boxed{{}}.")


def hand_batch():
    """Four groups of 3: one success (row 0, whose text holds a think block); two successes (rows 3, 4); a code
    group whose only success passes half its tests (row 6: reward 0.5, SDPO's threshold); a code group with no
    success, whose verifier reports failing tests."""
    math = [Example(f"Compute {g}+1.", str(g + 1), solution=f"{g}+1={g + 1}\nAnswer: {g + 1}") for g in range(2)]
    code = [Example(f"Write f{g}.", "f returns 1", tests=["assert f() == 1", "assert f() + 1 == 2"], task="code")
            for g in range(2)]
    examples = [math[0]] * 3 + [math[1]] * 3 + [code[0]] * 3 + [code[1]] * 3
    ok, bad = Verdict(1.0, True, "ok"), Verdict(0.0, False, "final answer 7 does not match")
    half, none = (Verdict(0.5, False, "passed 1 of 2 tests; first failure: E1"),
                  Verdict(0.0, False, "passed 0 of 2 tests"))
    verdicts = [ok, bad, bad, ok, ok, bad, half, none, none, none, Verdict(0.0, False, "no code block found"), none]
    texts = ["<think>hmm</think>\n0+1=1\nAnswer: 1", "Answer: 7", "Answer: 2", "A3", "A4", "A5"] + \
        [f"c{i}" for i in range(6, 12)]
    rewards = torch.tensor([v.reward for v in verdicts])
    return SimpleNamespace(examples=examples, verdicts=verdicts, rewards=rewards, rollout=SimpleNamespace(texts=texts))


def test_sdpo_context_equals_the_official_template_character_for_character():
    batch = hand_batch()
    messages, distilled = sd.teacher_messages(batch, sd.Args(context="sdpo", group_size=3), torch.Generator())
    p0, p1, c0, c1 = (batch.examples[i].prompt for i in (0, 3, 6, 9))
    expected = [
        p0,  # its group's only success is itself: SDPO never shows a row its own attempt
        sdpo_reference(p0, "0+1=1\nAnswer: 1", None),  # the peer, its think block removed
        sdpo_reference(p0, "0+1=1\nAnswer: 1", None),
        sdpo_reference(p1, "A4", None),  # two successes: each sees the other
        sdpo_reference(p1, "A3", None),
        sdpo_reference(p1, "A3", None),  # the first success of the group
        sdpo_reference(c0, None, "passed 1 of 2 tests; first failure: E1"),  # no other success: its feedback
        sdpo_reference(c0, "c6", None),  # reward 0.5 is a success: a peer, and then no feedback
        sdpo_reference(c0, "c6", None),
        sdpo_reference(c1, None, "passed 0 of 2 tests"),  # no success in the group: the environment's feedback
        sdpo_reference(c1, None, "no code block found"),
        sdpo_reference(c1, None, "passed 0 of 2 tests"),
    ]
    assert [m.text for m in messages] == expected
    assert expected[1] == f"{p0}\nCorrect solution:\n\n0+1=1\nAnswer: 1\n\nCorrectly solve the original question."
    assert distilled.tolist() == [False] + [True] * 11
    messages, distilled = sd.teacher_messages(batch, sd.Args(context="sdpo", group_size=3, env_feedback=False),
                                              torch.Generator())
    assert [m.text for m in messages[6:]] == [c0] + expected[7:9] + [c1] * 3
    assert distilled.tolist() == [False] + [True] * 5 + [False, True, True] + [False] * 3
    # A math row has no environment feedback here: without a peer, the plain prompt, not distilled.
    assert sd.environment_feedback(batch.examples[1], batch.verdicts[1]) is None


def test_opsd_and_antisd_contexts_equal_their_sources_character_for_character(capsys):
    batch = hand_batch()
    tracking.warned.discard("no-solution")
    messages, distilled = sd.teacher_messages(batch, sd.Args(context="opsd", group_size=3), torch.Generator())
    assert [m.text for m in messages] == [opsd_reference(e.prompt, e.solution or e.answer) for e in batch.examples]
    assert distilled.all()
    assert capsys.readouterr().out.count("without a reference solution") == 1  # the code rows: said once
    messages, distilled = sd.teacher_messages(batch, sd.Args(context="antisd", group_size=3),
                                              torch.Generator().manual_seed(0))
    sentence = ["Your answer is correct.", "Your answer is incorrect.", "Your answer is incorrect.",
                "Your answer is correct.", "Your answer is correct.", "Your answer is incorrect.",
                "Your code passes 1 of 2 test cases."] + ["Your code passes 0 of 2 test cases."] * 5
    texts, e = batch.rollout.texts, batch.examples
    solution = [e[0].solution, texts[0], texts[0], texts[4], texts[3], None] + ["f returns 1"] * 6
    for i, (m, feedback) in enumerate(zip(messages, sentence)):
        if solution[i] is None:  # two correct peers: sampled from them
            assert m.text in {ANTISD.format(prompt=e[i].prompt, solution=texts[j], feedback=feedback) for j in (3, 4)}
        else:
            assert m.text == ANTISD.format(prompt=e[i].prompt, solution=solution[i], feedback=feedback)
    assert distilled.all()


def test_presets_set_only_the_fields_left_at_their_defaults():
    sdpo = apply_preset(tyro.cli(sd.Args, args=["--preset", "sdpo", "--topk", "20"]), sd.PRESETS)
    assert (sdpo.context, sdpo.sd_loss, sdpo.grpo_coef, sdpo.teacher, sdpo.ema_rate, sdpo.jsd_alpha, sdpo.is_clip) == \
        ("sdpo", "logit", 0.0, "ema", 0.05, 0.5, 2.0) and sdpo.topk == 20
    opsd = apply_preset(tyro.cli(sd.Args, args=["--preset", "opsd"]), sd.PRESETS)
    assert (opsd.context, opsd.sd_loss, opsd.grpo_coef, opsd.teacher, opsd.topk, opsd.jsd_alpha) == \
        ("opsd", "logit", 0.0, "initial", 0, 0.5)
    assert apply_preset(sd.Args(), sd.PRESETS) == sd.Args()


def test_undistilled_rows_add_nothing_to_the_loss_or_its_gradient_and_the_mean_counts_distilled_tokens():
    g = torch.Generator().manual_seed(3)
    B, T, V, k = 3, 4, 12, 5
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    s = F.log_softmax(logits, -1)
    y = torch.randint(0, V, (B, T), generator=g)
    idx = s.detach().topk(k, -1).indices

    def buckets(logp):  # k top-k log-probs, then log of the remaining mass
        top = logp.gather(-1, idx)
        return torch.cat([top, torch.log(1 - top.exp().sum(-1, keepdim=True))], -1)

    teacher = buckets(F.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1))
    logprobs = s.gather(-1, y[..., None]).squeeze(-1)
    old = logprobs.detach() + torch.tensor([[0.0, 0.5, -1.0, 2.0]] * B, dtype=torch.float64)  # weights 1, e^-.5, e, 2
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
    distill_mask = mask * torch.tensor([1.0, 0.0, 1.0])[:, None]  # row 1 has neither a peer nor feedback
    args = sd.Args(lam_sd=0.7, jsd_alpha=0.5, is_clip=2.0)

    def loss_of(teacher_buckets):
        mb = MicroBatch(torch.arange(B), {"logprobs": logprobs, "gathered": buckets(s)}, mask.float(), B,
                        {"completion": mask.sum(), "distill": distill_mask.sum()})
        divergence = sd.generalized_jsd(mb.out["gathered"], teacher_buckets[mb.rows], args.jsd_alpha)
        return sd.distillation_loss(mb, args, old, divergence, distill_mask)[0]

    loss = loss_of(teacher)
    naive, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            if distill_mask[b, t]:
                w = min(math.exp(logprobs[b, t].item() - old[b, t].item()), 2.0)
                naive += w * naive_jsd(buckets(s)[b, t].detach().exp(), teacher[b, t].exp(), 0.5).item()
                count += 1
    assert count == 5 and loss.item() == pytest.approx(0.7 * naive / count, rel=1e-10)
    loss.backward()
    assert logits.grad[1].abs().max().item() == 0.0 and logits.grad[0].abs().sum() > 0
    assert logits.grad[0, 3].abs().max().item() == 0.0  # a padding token of a distilled row
    garbage = teacher.clone()
    garbage[1] = torch.log_softmax(torch.randn(T, k + 1, generator=g, dtype=torch.float64), -1)
    assert loss_of(garbage).item() == loss.item()  # row 1's teacher is never read


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_full_vocabulary_jsd_matches_a_naive_loop_and_its_gradient(temperature):
    """OPSD's loss through the paired chunked path: generalized JSD (beta 0.5) over the whole vocabulary."""
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 5, 8, 23
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    student_h = torch.randn(B, T, H, generator=g, requires_grad=True)
    teacher_h = torch.randn(B, T, H, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    out = token_stats(student_h, head, y, temperature, 3, paired_hidden=teacher_h, paired_head=head,
                      paired_fn=functools.partial(sd.full_vocab_jsd, alpha=0.5))
    naive = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            p_s = torch.softmax(head(student_h[b, t]).double() / temperature, -1)
            p_t = torch.softmax(head(teacher_h[b, t]).double() / temperature, -1)
            naive[b, t] = naive_jsd(p_s, p_t, 0.5)
    torch.testing.assert_close(out["paired"].double(), naive, atol=1e-5, rtol=1e-5)
    out["paired"].sum().backward()
    grad, student_h.grad = student_h.grad, None
    naive.sum().backward()
    torch.testing.assert_close(grad, student_h.grad, atol=1e-5, rtol=1e-4)


def coin_verify(example, completion):
    ok = zlib.crc32(completion.encode()) % 2 == 0
    return Verdict(float(ok), ok, "")


def test_sdpo_preset_distils_only_rows_with_a_peer_and_logs_it(tiny_model_dir, tmp_path, monkeypatch):
    seen = []

    class Recording(sd.Update):
        def __init__(self, run, args, batch, step, old_logprobs=None, token_masks=None):
            seen.append((batch, token_masks["distill"]))
            super().__init__(run, args, batch, step, old_logprobs, token_masks)

    monkeypatch.setattr(batch_module, "verify", coin_verify)
    monkeypatch.setattr(sd, "Update", Recording)
    rows = run_script(sd, tiny_model_dir, tmp_path / "p", "--preset", "sdpo", "--topk", "8")
    for (batch, distill), row in zip(seen, rows):
        ok = torch.tensor([v.correct for v in batch.verdicts]).view(-1, 4)
        has_peer = (ok.sum(1, keepdim=True) - ok.long() > 0).reshape(-1)  # another success in the group
        mask = batch.rollout.completion_mask.float()
        assert torch.equal(distill, mask * has_peer[:, None]) and 0 < has_peer.sum() < len(has_peer)
        assert row["sd/frac_rows_distilled"] == pytest.approx(has_peer.float().mean().item())
        assert row["sd/frac_groups_with_success"] == pytest.approx(ok.any(1).float().mean().item())
        assert row["loss/distill"] > 0 and row["adv/abs_mean"] == 0  # no GRPO term


def test_a_step_that_distils_nothing_warns_once_and_changes_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(batch_module, "verify", lambda example, completion: Verdict(0.0, False, ""))
    teacher_module._silent_warning["step"] = None
    rows = run_script(sd, tiny_model_dir, tmp_path / "n", "--preset", "sdpo", "--topk", "8", "--teacher", "current")
    assert all(r["sd/frac_rows_distilled"] == 0 and r["loss/distill"] == 0 for r in rows)
    assert all(r["sd/frac_groups_with_success"] == 0 and r["train/grad_norm"] == 0 for r in rows)
    assert capsys.readouterr().out.count("distils no row") == 1  # 3 silent steps, one warning


def test_opsd_preset_runs_the_full_vocabulary_loss_against_the_initial_model(tiny_model_dir, tmp_path):
    rows = run_script(sd, tiny_model_dir, tmp_path / "o", "--preset", "opsd")
    assert all(r["loss/distill"] > 0 and r["sd/frac_rows_distilled"] == 1 for r in rows)
    with pytest.raises(ValueError, match="one update per batch"):  # the current teacher's head is read in the update
        sd.Args(sd_loss="logit", topk=0, ppo_epochs=2)
    assert sd.Args(sd_loss="logit", topk=0, ppo_epochs=2, teacher="initial").teacher == "initial"


def test_coverage_metrics_counts_and_rate_limits_its_warning(capsys):
    teacher_module._silent_warning["step"] = None
    successful = torch.tensor([True, False, False, False, False, False])  # groups of 3: one with a success
    got = teacher_module.coverage_metrics(torch.tensor([False, True, True, False, False, False]), successful, 3, 0)
    assert got == {"sd/frac_rows_distilled": pytest.approx(2 / 6), "sd/frac_groups_with_success": 0.5}
    none = torch.zeros(6, dtype=torch.bool)
    warned = []
    for step in range(1, 40):
        teacher_module.coverage_metrics(none if step != 25 else ~none, none, 3, step)
        warned += [step] * capsys.readouterr().out.count("distils no row")
    assert warned == [1, 11, 21, 26, 36]  # the first silent step, then every 10th; a distilling step resets it
    teacher_module._silent_warning["step"] = None
    teacher_module.coverage_metrics(none, none, 3, 40, is_main=False)  # other ranks never print
    assert capsys.readouterr().out == ""

"""sd.py: the pMI identity, teacher alignment, lam=0 == grpo, the generalized JSD, EMA, fallbacks."""
import json

import pytest
import torch
import torch.nn.functional as F
import tyro

import grpo
import sd
from common import tracking
from common.example import Example
from common.logprobs import score_completions
from common.prompts import render_prompts, tokenize_left
from common.rollout import generate
from common.teacher import teacher_inputs, teacher_prompt
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
    blocks = [f"The correct final answer is: {i}" * (1 + i % 3) for i in range(6)]
    ids, mask, _ = teacher_inputs(tokenizer, problems, blocks, 10_000, torch.device("cpu"))
    t = score_completions(policy, ids, mask, r.completion_ids, r.completion_mask, 1.0, 5, 3)
    u = sd.token_credit(t["logprobs"], old["logprobs"], r.completion_mask.float())
    for i in range(6):
        y = r.completion_ids[i][r.completion_mask[i].bool()].tolist()
        student = seq_logprob(policy, tokenizer, prompts[i // 2], y)
        teacher = seq_logprob(policy, tokenizer, render_prompts(tokenizer, [teacher_prompt(problems[i], blocks[i])])[0], y)
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


def test_privileged_block_fallback_says_once(capsys):
    tracking.warned.clear()
    ok, bad = Verdict(1.0, True, ""), Verdict(0.0, False, "")
    no_solution = Example("Compute 1+2.", "3", solution=None)
    assert sd.privileged_block(no_solution, ok, "solution", True) == \
        "The correct final answer is: 3\n\nYour previous attempt was correct."
    sd.privileged_block(no_solution, bad, "solution", True)
    assert capsys.readouterr().out.count("answer-only") == 1
    with_solution = Example("Compute 1+2.", "3", solution="1+2=3\nAnswer: 3")
    assert sd.privileged_block(with_solution, bad, "solution", True) == "1+2=3\nAnswer: 3\n\nYour previous attempt was incorrect."
    assert sd.privileged_block(with_solution, bad, "answer", False) == "The correct final answer is: 3"
    code = Example("f", "", tests=["assert f()"], task="code")
    assert "passed 1 of 2" in sd.privileged_block(code, Verdict(0.5, False, "passed 1 of 2 tests"), "answer", True)


def test_long_teacher_prompt_is_shortened_in_the_middle(tokenizer):
    block = "HEAD " + "m" * 500 + " TAIL"
    ids, mask, shortened = teacher_inputs(tokenizer, ["Compute 1+2.", "Compute 3+4."], [block, "short"], 120, torch.device("cpu"))
    assert shortened.tolist() == [True, False] and mask.sum(-1).max().item() <= 120
    text = tokenizer.decode(ids[0][mask[0].bool()])
    assert "Compute 1+2." in text and "HEAD" in text and "TAIL" in text and "[...]" in text
    assert "Now solve the original problem step by step." in text
    # A limit below the problem + instruction alone leaves them intact rather than failing.
    ids, mask, _ = teacher_inputs(tokenizer, ["Compute 1+2."], [block], 10, torch.device("cpu"))
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


def test_teacher_instruction_is_the_prompts_last_line_or_absent(tokenizer):
    assert teacher_prompt("Q", "B") == "Q\n\nB\n\nNow solve the original problem step by step."
    assert teacher_prompt("Q", "B", "Answer it.") == "Q\n\nB\n\nAnswer it."
    assert teacher_prompt("Q", "B", "") == "Q\n\nB"
    ids, mask, _ = teacher_inputs(tokenizer, ["Compute 1+2."], ["B"], 10_000, torch.device("cpu"), instruction="")
    assert tokenizer.decode(ids[0][mask[0].bool()]) == render_prompts(tokenizer, ["Compute 1+2.\n\nB"])[0]


@pytest.mark.parametrize("script", ["sd", "credit", "antisd", "hsd"])
def test_teacher_instruction_flag_reaches_every_teacher_pass(script, tiny_model_dir, tmp_path, monkeypatch):
    """--teacher-instruction "" drops the last line from every teacher prompt a script scores (the contrast and
    answer-only diagnostic passes included); the default keeps it."""
    import importlib

    from common import teacher

    module, seen = importlib.import_module(script), []
    original = teacher.teacher_inputs

    def recording(tok, problems, blocks, max_tokens, device, enable_thinking=False, instruction="unset"):
        seen.append(instruction)
        return original(tok, problems, blocks, max_tokens, device, enable_thinking, instruction)

    monkeypatch.setattr(teacher, "teacher_inputs", recording)
    extra = ["--diagnostics-every", "1"] if script == "hsd" else []
    run_script(module, tiny_model_dir, tmp_path / "none", "--teacher-instruction", "", *extra)
    assert seen and set(seen) == {""}
    seen.clear()
    run_script(module, tiny_model_dir, tmp_path / "default", *extra)
    assert seen and set(seen) == {teacher.TEACHER_INSTRUCTION}

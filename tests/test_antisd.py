"""antisd.py: phi's bounds and its JSD-gradient meaning, the gate trace, teacher entropy, lam_max=0 == grpo, resume."""
import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import tyro
from test_sd import PROBLEMS, run_script

import antisd
import grpo
import sd
from common import tracking
from common.dist import Dist
from common.example import Example
from common.logprobs import naive_token_stats
from common.prompts import render_prompts
from common.rollout import generate
from common.teacher import TeacherMessage, choose_peers, score_teacher
from common.verifiers import Verdict

HALF_LOG2 = 0.5 * math.log(2)


def test_delta_bounded_finite_and_shaped():
    u = torch.cat([torch.linspace(-1e4, 1e4, 200_001), torch.tensor([-1e4, 1e4, -1e3, 1e3])]).double()
    delta = antisd.antisd_credit(u)
    assert torch.isfinite(delta).all() and (delta <= HALF_LOG2).all()
    assert delta[-4].item() == pytest.approx(HALF_LOG2) and delta[-3].item() == pytest.approx(-1e4 / 2 + HALF_LOG2)
    d32 = antisd.antisd_credit(u.float())  # the training dtype: no overflow to inf at |u| = 1e4 either
    assert torch.isfinite(d32).all() and (d32.double() <= HALF_LOG2 + 1e-7).all()
    assert antisd.phi(torch.tensor(0.0)).item() == pytest.approx(0.0, abs=1e-8)
    assert (antisd.phi(u[:-4]).diff() >= 0).all()  # monotone everywhere ...
    grid = torch.linspace(-20, 20, 4001, dtype=torch.float64)
    assert (antisd.phi(grid).diff() > 0).all()  # ... strictly where float64 resolves it
    for x in [1e-2, -1e-2, 1e-3, -3e-4]:  # phi(u) = u/4 + u^2/16 + O(u^4)
        assert antisd.antisd_credit(torch.tensor(x, dtype=torch.float64)).item() == pytest.approx(-x / 4, rel=1e-2)
    assert torch.equal(antisd.antisd_credit(u, "revkl"), -u)


@pytest.mark.parametrize("divergence", ["jsd", "revkl"])
def test_credit_is_score_function_coefficient_of_divergence_ascent(divergence):
    # JSD(pS, pT) = 0.5 KL(pS||M) + 0.5 KL(pT||M), M = (pS + pT)/2, is the f-divergence
    # sum_y pT(y) f(r_y) with r = pS/pT and f(r) = 0.5 [r log(2r/(1+r)) + log(2/(1+r))]. Its gradient is
    # sum_y pT f'(r) grad r = sum_y f'(r) grad pS = E_{y~pS}[f'(r_y) grad log pS(y)]: a policy gradient whose
    # per-sample coefficient is f'(r) = 0.5 log(2r/(1+r)) = 0.5 (log 2 - softplus(u)) = -phi(u), u = -log r.
    # So folding delta = -phi(u) into the advantage ascends the JSD. Reverse KL: grad KL(pS||pT) =
    # E_pS[(log pS - log pT) grad log pS] + E_pS[grad log pS] = E_pS[-u grad log pS] (the last term is 0).
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=g, dtype=torch.float64)
    log_t = F.log_softmax(2 * torch.randn(6, generator=g, dtype=torch.float64), -1)

    def divergence_at(th: torch.Tensor) -> float:
        return sd.generalized_jsd(F.log_softmax(th, -1), log_t, 0.5 if divergence == "jsd" else 1.0).item()

    log_s = F.log_softmax(theta, -1)
    p = log_s.exp()
    score = torch.eye(6, dtype=torch.float64) - p[None, :]  # [y, k]: d log pS(y) / d theta_k
    analytic = (p[:, None] * antisd.antisd_credit(log_t - log_s, divergence)[:, None] * score).sum(0)
    h = 1e-6
    numeric = torch.tensor([(divergence_at(theta + h * e) - divergence_at(theta - h * e)) / (2 * h)
                            for e in torch.eye(6, dtype=torch.float64)], dtype=torch.float64)
    torch.testing.assert_close(analytic, numeric, atol=1e-8, rtol=1e-6)


def run_gate(gate: antisd.EntropyGate, medians: list[float]) -> list[float]:
    return [gate.update(h, torch.tensor([h])) for h in medians]


def test_gate_trace_warmup_drop_band_recovery():
    gate = antisd.EntropyGate(warmup_steps=3, down=0.93, agg="step-median")
    assert run_gate(gate, [1.0, 1.2, 0.8]) == [0.0, 0.0, 0.0] and gate.h_warm == 1.0  # tau_down = 0.93
    # on; drop below tau_down -> off; hovering in [0.93, 1.0) stays off; H_warm -> on; in the band stays on.
    medians = [0.95, 0.92, 0.95, 0.931, 0.999, 1.0, 0.94, 0.93, 0.98, 0.929, 0.99, 1.5]
    assert run_gate(gate, medians) == [1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1]
    # Straight after warm-up the trigger applies at once from g = 1.
    late = antisd.EntropyGate(warmup_steps=1)
    assert run_gate(late, [2.0, 1.0]) == [0.0, 0.0]
    assert run_gate(antisd.EntropyGate(enabled=False), [1.0, 0.1, 5.0]) == [1.0, 1.0, 1.0]  # --no-gate
    with pytest.raises(ValueError, match="--no-gate"):
        antisd.EntropyGate(warmup_steps=0)


def test_h_warm_pooled_vs_step_median():
    steps = [torch.full((10,), 0.1), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0])]
    pooled, per_step = antisd.EntropyGate(3, agg="pooled"), antisd.EntropyGate(3, agg="step-median")
    for e in steps:
        pooled.update(e.median().item(), e)
        per_step.update(e.median().item(), e)
    assert per_step.h_warm == 2.0 and pooled.h_warm == pytest.approx(0.1, abs=antisd.BIN_NATS / 2)
    assert pooled.counts is None and pooled.medians == []  # the warm-up record is dropped once H_warm is known


def test_pooled_histogram_median_matches_exact():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        steps = [3 * torch.rand(int(torch.randint(1, 40, (1,), generator=g)), generator=g) for _ in range(4)]
        gate = antisd.EntropyGate(4)
        for e in steps:
            gate.update(e.median().item(), e)
        exact = torch.cat(steps).median().item()  # the lower median, as the histogram's
        assert abs(gate.h_warm - exact) <= antisd.BIN_NATS / 2 + 1e-9


def test_gate_state_dict_round_trip_mid_warmup():
    steps = [torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.9, 1.1]), torch.tensor([1.3])] + \
            [torch.tensor([h]) for h in (1.0, 0.8, 0.95, 1.2, 0.5)]
    whole = antisd.EntropyGate(3)
    expected = [whole.update(e.median().item(), e) for e in steps]
    first = antisd.EntropyGate(3)
    trace = [first.update(e.median().item(), e) for e in steps[:2]]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    resumed = antisd.EntropyGate(3)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    trace += [resumed.update(e.median().item(), e) for e in steps[2:]]
    assert trace == expected and resumed.h_warm == whole.h_warm and 0.0 in expected and 1.0 in expected


def test_teacher_context_is_appendix_c_with_a_peer_then_the_reference():
    correct = torch.tensor([False, True, True, False, False, False, False, True])
    assert choose_peers(correct, 4, "first").tolist() == [1, 2, 1, 1, 7, 7, 7, -1]
    ok, bad = Verdict(1.0, True, ""), Verdict(0.0, False, "")
    ex = Example("Compute 1+2.", "3", solution="1+2=3\nAnswer: 3")
    tail = "\nNow solve this problem step by step."
    assert antisd.antisd_message(ex, bad, "peer text").text == \
        "Compute 1+2.\n\nYour previous attempt:\npeer text\n\nPrevious assessment: Your answer is incorrect." + tail
    assert antisd.antisd_message(ex, ok, None).text == \
        "Compute 1+2.\n\nYour previous attempt:\n1+2=3\nAnswer: 3\n\n" \
        "Previous assessment: Your answer is correct." + tail
    code = Example("f", "", tests=["assert a", "assert b", "assert c", "assert d"], task="code",
                   solution="def f(): ...")
    assert antisd.antisd_message(code, Verdict(0.75, False, "x"), None).tail == \
        "\n\nPrevious assessment: Your code passes 3 of 4 test cases." + tail


@torch.no_grad()
def test_teacher_entropy_chunked_equals_full_softmax(policy, tokenizer):
    torch.manual_seed(0)
    r = generate(policy, tokenizer, render_prompts(tokenizer, PROBLEMS), 2, 12, temperature=1.0)
    examples = [Example(p, "0") for p in PROBLEMS for _ in range(2)]
    messages = [TeacherMessage(f"{e.prompt}\n\n", f"The correct final answer is: {i}" * (1 + i % 3))
                for i, e in enumerate(examples)]
    args = antisd.Args(temperature=0.7, logprob_chunk=5, micro_batch_rows=4)
    run = SimpleNamespace(args=args, policy=policy, teacher_model=policy, tokenizer=tokenizer, d=Dist())
    out = score_teacher(run, args, SimpleNamespace(rollout=r, examples=examples), messages,
                        args.max_teacher_prompt_tokens, with_entropy=True)
    for i in range(6):  # one unpadded full-vocabulary forward per row
        p = tokenizer(render_prompts(tokenizer, [messages[i].text])[0],
                      add_special_tokens=False).input_ids
        y = r.completion_ids[i][r.completion_mask[i].bool()]
        logits = policy.lm(input_ids=torch.tensor(p + y.tolist())[None]).logits[0, len(p) - 1:-1]
        naive = naive_token_stats(logits, y, 0.7)["entropy"]
        torch.testing.assert_close(out["entropy"][i][r.completion_mask[i].bool()], naive, atol=1e-4, rtol=1e-4)
    assert (out["entropy"][~r.completion_mask.bool()] == 0).all()


def test_has_no_logit_mode_and_no_other_teachers():
    """AntiSD folds its credit into the advantage with the current policy as teacher: the flags do not exist."""
    for flags in (["--sd-loss", "logit"], ["--teacher", "ema"], ["--lam", "0.5"]):
        with pytest.raises(SystemExit):
            tyro.cli(antisd.Args, args=flags)


def strip_perf(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def test_lam_max_zero_reproduces_grpo(tiny_model_dir, tmp_path):
    small = ["--max-new-tokens", "12", "--eval-size", "4"]
    g = run_script(grpo, tiny_model_dir, tmp_path / "g", *small)
    a = run_script(antisd, tiny_model_dir, tmp_path / "a", *small, "--lam-max", "0", "--no-gate")  # weight 0 only
    assert len(g) == len(a) == 3
    for x, y in zip(g, a):
        assert {k: x[k] for k in x if not k.startswith("perf/")} == {k: y[k] for k in x if not k.startswith("perf/")}
        assert y["gate/on"] == 1.0 and "antisd/delta_mean" in y and "sd/pmi_seq_mean" in y


def test_crash_then_resume_restores_gate(tiny_model_dir, tmp_path, monkeypatch):
    flags = ["--total-steps", "4", "--gate-warmup-steps", "1", "--save-every", "2", "--eval-every", "0",
             "--num-prompts", "2", "--max-new-tokens", "12"]
    full = run_script(antisd, tiny_model_dir, tmp_path / "full", *flags)
    original = tracking.Tracker.log

    def crash_after_step_2(self, step, metrics):
        original(self, step, metrics)
        if step == 2:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(tracking.Tracker, "log", crash_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_script(antisd, tiny_model_dir, tmp_path / "resumed", *flags)
    monkeypatch.setattr(tracking.Tracker, "log", original)
    # The checkpoint after step 1 holds H_warm (the warm-up was step 0) and g; a fresh gate would be in warm-up.
    state = torch.load(tmp_path / "resumed" / "checkpoint" / "state.pt", weights_only=False)["extra"]["gate"]
    assert state["step"] == 2 and state["h_warm"] == full[0]["gate/h_warm"]
    resumed = run_script(antisd, tiny_model_dir, tmp_path / "resumed", *flags, "--resume")
    assert strip_perf(resumed) == strip_perf(full)
    assert full[0]["gate/on"] == 0.0 and all(r["gate/h_warm"] == full[0]["gate/h_warm"] for r in full)


def test_peer_is_drawn_from_the_other_correct_rows(tmp_path, monkeypatch):
    """Each row's verified solution is another correct row of its group, drawn at random (seeded), not always
    the first."""
    calls = []
    score = antisd.score_teacher
    monkeypatch.setattr(antisd, "score_teacher", lambda run, args, batch, messages, *a, **kw:
                        calls.append((batch, [m.block for m in messages]))
                        or score(run, args, batch, messages, *a, **kw))
    flags = ["--total-steps", "3", "--eval-every", "0", "--num-prompts", "4", "--group-size", "8",
             "--max-new-tokens", "48", "--sample-every", "0"]
    run_script(antisd, "toy", tmp_path / "r", *flags)
    not_first = 0
    for batch, blocks in calls:
        texts, G = batch.rollout.texts, 8
        for i, block in enumerate(blocks):
            group = range(i // G * G, i // G * G + G)
            others = [j for j in group if j != i and batch.verdicts[j].correct]
            if others:
                chosen = [j for j in others if block == texts[j]]
                assert chosen, f"row {i}: the block is not a correct peer's text"
                not_first += others[0] not in chosen
    assert not_first > 0
    again = []
    monkeypatch.setattr(antisd, "score_teacher", lambda run, args, batch, messages, *a, **kw:
                        again.append([m.block for m in messages]) or score(run, args, batch, messages, *a, **kw))
    run_script(antisd, "toy", tmp_path / "s", *flags)
    assert again == [blocks for _, blocks in calls]  # seeded: the same draws again

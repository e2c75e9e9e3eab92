"""The embedded default: a byte-level ChatML tokenizer, a tiny Qwen3, a chained-addition task, its pre-training."""
from __future__ import annotations

import argparse
import hashlib
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from common.example import Example

TOY_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy-base"
REGEN_COMMAND = "python -m common.toy"

# Difficulty knobs: each problem adds N_TERMS numbers of 1..DIGITS digits, one worked step per addition.
N_TERMS = 3
DIGITS = 2
N_TRAIN, N_TEST = 5000, 200
# Stopped by step count before the student's accuracy jumps (measured with `python -m common.toy --measure`):
# 24.5% greedy (51.5% 50 steps later), 88-98% with a correct solution in any script's teacher prompt, 13%
# sampled at temperature 1, and 57% of groups
# of 8 samples hold a correct one, so that RL has a signal to learn from.
PRETRAIN_STEPS = 1000
TEST_BUCKETS = 10  # a problem belongs to the test split iff hash(prompt) % TEST_BUCKETS == 0

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
FEEDBACK = ("Your previous attempt was correct.", "Your previous attempt was incorrect.",
            "Your answer is correct.", "Your answer is incorrect.")


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per byte (so any text round-trips) plus the three ChatML special tokens."""
    # GPT-2's byte->symbol map (what the ByteLevel pre-tokenizer emits), so that token id == byte value;
    # BPE with no merges never joins them.
    keep = {*range(33, 127), *range(161, 173), *range(174, 256)}
    extra = iter(range(256, 512))
    vocab = {chr(b) if b in keep else chr(next(extra)): b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([IM_START, IM_END, PAD])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, additional_special_tokens=[IM_START])
    # Unused template variables (e.g. `enable_thinking`) are ignored by jinja, as callers pass them for Qwen3.
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer: transformers.PreTrainedTokenizerFast, seed: int) -> transformers.Qwen3ForCausalLM:
    """A ~0.5M-parameter Qwen3 with freshly seeded weights."""
    torch.manual_seed(seed)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.convert_tokens_to_ids(IM_START))
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=32, intermediate_size=384, max_position_embeddings=1024,
        tie_word_embeddings=True, **ids)
    model = transformers.Qwen3ForCausalLM(config)
    model.generation_config = transformers.GenerationConfig(**ids)
    return model


def make_example(rng: random.Random, n_terms: int = N_TERMS, digits: int = DIGITS) -> Example:
    """A random chain of additions written as one worked step per line, then `Answer: N`."""
    terms = [rng.randint(1, 10**digits - 1) for _ in range(n_terms)]
    steps, total = [], terms[0]
    for t in terms[1:]:
        steps.append(f"{total}+{t}={total + t}")
        total += t
    prompt = "Compute " + "+".join(map(str, terms)) + "."
    return Example(prompt=prompt, answer=str(total), solution="\n".join(steps) + f"\nAnswer: {total}", task="toy")


def is_test(prompt: str) -> bool:
    """Hash bucketing keeps the held-out split disjoint from train and from the pre-training stream."""
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % TEST_BUCKETS == 0


def examples(split: str) -> list[Example]:
    """The deterministic train (N_TRAIN) or held-out test (N_TEST) problems."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown toy split {split!r}: use 'train' or 'test'")
    want_test, n = split == "test", (N_TEST if split == "test" else N_TRAIN)
    rng, seen, out = random.Random(f"toy-{split}"), set(), []
    while len(out) < n:
        ex = make_example(rng)
        if is_test(ex.prompt) == want_test and ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out


def student_text(tokenizer: transformers.PreTrainedTokenizerFast, prompt: str) -> str:
    """The chat-rendered user turn followed by the assistant generation prompt."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def teacher_text(problem: str, block: str) -> str:
    """hsd.py's teacher prompt wording: `{problem}\n\n{block}\n\nNow solve the original problem step by step.`."""
    return f"{problem}\n\n{block}\n\nNow solve the original problem step by step."


def random_privileged(rng: random.Random, ex: Example) -> str:
    """One of the privileged blocks hsd.py builds (solution, answer, peer and answer), optionally with feedback."""
    block = rng.choice([ex.solution, f"The correct final answer is: {ex.answer}",
                        f"A correct solution:\n\n{ex.solution}\n\nThe correct final answer is: {ex.answer}"])
    return block + "\n\n" + rng.choice(FEEDBACK[:2]) if rng.random() < 0.5 else block


TEACHER_CONTEXTS = ("sdpo", "opsd", "antisd", "hsd")
"""The teacher contexts of the SD scripts."""
CONTEXT_WEIGHTS = (1, 1, 1, 3)
"""How often pre-training draws each context: hsd.py's wording holds three blocks (solution, answer, peer)."""


def teacher_message(ex: Example, context: str, rng: random.Random) -> str:
    """The teacher user message of `context` around a correct solution: SDPO's, OPSD's and AntiSD's templates (sd.py
    writes them verbatim; a test keeps these equal), or hsd.py's wording with one of its blocks (drawn with `rng`)."""
    if context == "sdpo":
        return f"{ex.prompt}\nCorrect solution:\n\n{ex.solution}\n\nCorrectly solve the original question."
    if context == "opsd":
        return (f"{ex.prompt}\n\nHere is a reference solution to this problem:\n{ex.solution}\n\n\nAfter understanding "
                f"the reference solution and the rationale behind each step, now articulate your own step-by-step "
                f"reasoning that derives the same final answer to the problem below:\n\nPlease reason step by step, "
                f"and put your final answer within \\boxed{{}}.")
    if context == "antisd":
        return (f"{ex.prompt}\n\nYour previous attempt:\n{ex.solution}\n\nPrevious assessment: "
                f"{rng.choice(FEEDBACK[2:])}\nNow solve this problem step by step.")
    return teacher_text(ex.prompt, random_privileged(rng, ex))


def random_teacher_message(rng: random.Random, ex: Example) -> str:
    """A teacher user message in one of the contexts, drawn with CONTEXT_WEIGHTS."""
    return teacher_message(ex, rng.choices(TEACHER_CONTEXTS, weights=CONTEXT_WEIGHTS)[0], rng)


def batch_loss(model: transformers.Qwen3ForCausalLM, tokenizer: transformers.PreTrainedTokenizerFast,
               prompts: list[str], targets: list[str]) -> tuple[torch.Tensor, int]:
    """Summed next-token loss on the completion tokens (target + eos) and their count."""
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    c_ids = [ids + [tokenizer.eos_token_id] for ids in tokenizer(targets, add_special_tokens=False)["input_ids"]]
    width = max(len(p) + len(c) for p, c in zip(p_ids, c_ids))
    # Right padding needs no attention mask: causal attention never lets a real token see a later pad,
    # and RoPE is relative, so this matches left-padded generation.
    ids = torch.full((len(p_ids), width), tokenizer.pad_token_id)
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(zip(p_ids, c_ids)):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
    logits = model(input_ids=ids).logits[:, :-1]
    loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    return loss, int((labels != -100).sum())


def pretrain(out_dir: Path = TOY_MODEL_DIR, seed: int = 0, steps: int = PRETRAIN_STEPS, batch_size: int = 64,
             lr: float = 1e-2, teacher_frac: float = 0.4375, log_every: int = 50) -> None:
    """Supervised pre-training on student and privileged-teacher prompts, stopped early on purpose."""
    torch.set_num_threads(1)  # one thread: the same float reductions, so the same checkpoint, on any CPU
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    start = time.time()
    for step in range(1, steps + 1):
        # A fresh problem stream (test problems excluded) instead of the train split avoids memorisation.
        batch = [ex for ex in (make_example(rng) for _ in range(2 * batch_size)) if not is_test(ex.prompt)]
        batch = batch[:batch_size]
        n_teacher = round(teacher_frac * batch_size)
        student, teacher = batch[n_teacher:], batch[:n_teacher]
        loss_s, n_s = batch_loss(model, tokenizer, [student_text(tokenizer, ex.prompt) for ex in student],
                                 [ex.solution for ex in student])
        loss_t, n_t = batch_loss(model, tokenizer, [student_text(tokenizer, random_teacher_message(rng, ex))
                                                    for ex in teacher], [ex.solution for ex in teacher])
        loss = (loss_s + loss_t) / (n_s + n_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss.item():.4f} student {loss_s.item() / n_s:.4f} "
                  f"teacher {loss_t.item() / n_t:.4f} ({time.time() - start:.0f}s)", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def extract_answer(completion: str) -> str:
    """The text after the last `Answer:` (empty if none), as the toy verifier reads it."""
    return completion.rsplit("Answer:", 1)[1].strip() if "Answer:" in completion else ""


@torch.no_grad()
def accuracy(model: transformers.Qwen3ForCausalLM, tokenizer: transformers.PreTrainedTokenizerFast,
             prompts: list[str], answers: list[str], temperature: float = 0.0, batch_size: int = 200) -> float:
    """Exact-match accuracy of one completion per user message (greedy when temperature is 0)."""
    tokenizer.padding_side = "left"
    correct = 0
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer([student_text(tokenizer, p) for p in prompts[i:i + batch_size]], return_tensors="pt",
                        padding=True, add_special_tokens=False)
        sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else {}
        out = model.generate(**enc, max_new_tokens=64, **(sample or {"do_sample": False}))
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(extract_answer(t) == a for t, a in zip(texts, answers[i:i + batch_size]))
    return correct / len(prompts)


def measure(model_dir: Path = TOY_MODEL_DIR, n: int | None = None, seed: int = 0) -> dict[str, float]:
    """Test-split accuracy of the student prompt, of each script's teacher prompt around the reference solution (HSD's
    with a correct peer's block), of hsd.py's answer-only teacher prompt, and of the student prompt sampled at T=1."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    test = examples("test")[:n]
    answers = [ex.answer for ex in test]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    hsd_peer = [teacher_text(ex.prompt, f"A correct solution:\n\n{ex.solution}\n\nThe correct final answer is: "
                                        f"{ex.answer}") for ex in test]
    return {
        "base_greedy": accuracy(model, tokenizer, [ex.prompt for ex in test], answers),
        **{f"{c}_context": accuracy(model, tokenizer, [teacher_message(ex, c, rng) for ex in test], answers)
           for c in TEACHER_CONTEXTS[:3]},
        "hsd_peer_context": accuracy(model, tokenizer, hsd_peer, answers),
        "answer_context": accuracy(model, tokenizer, [teacher_text(
            ex.prompt, f"The correct final answer is: {ex.answer}") for ex in test], answers),
        "sampled_t1": accuracy(model, tokenizer, [ex.prompt for ex in test], answers, temperature=1.0),
    }


def load_toy(device: str = "cpu") -> tuple[transformers.Qwen3ForCausalLM, transformers.PreTrainedTokenizerFast]:
    """The shipped toy base model and its tokenizer."""
    if not (TOY_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(f"toy checkpoint missing at {TOY_MODEL_DIR}; regenerate it with `{REGEN_COMMAND}`")
    model = transformers.AutoModelForCausalLM.from_pretrained(TOY_MODEL_DIR).to(device)
    return model, transformers.AutoTokenizer.from_pretrained(TOY_MODEL_DIR)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Regenerate the toy base checkpoint, then measure it.")
    parser.add_argument("--measure", action="store_true", help="only measure the existing checkpoint")
    parser.add_argument("--out", type=Path, default=TOY_MODEL_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=PRETRAIN_STEPS)
    args = parser.parse_args()
    if not args.measure:
        pretrain(args.out, seed=args.seed, steps=args.steps)
    for name, value in measure(args.out).items():
        print(f"{name}: {value:.3f}")

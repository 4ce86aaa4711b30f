"""The real SmolLM2-135M-Instruct (a Q4_1 GGUF file): our text-generation pipeline against transformers' GGUF
loader on the same file. Prompt ids (tokenizer and chat template), greedy tokens and logits must agree."""

import pytest
import torch
import transformers

from pipelines import pipeline
from pipelines.hub import DEFAULT_CHAT_MODEL, import_folder

NEW_TOKENS = 48
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [
        {"role": "user", "content": "I have 3 apples and buy 12 more. How many do I have?"},
        {"role": "assistant", "content": "You have 15 apples."},
        {"role": "user", "content": "And if I eat 4 of them?"},
    ],
    [{"role": "user", "content": "List three uses of a paperclip, numbered."}],
    [{"role": "user", "content": "Translate 'good morning' into French, German and Spanish."}],
    [{"role": "user", "content": "Explain recursion to a child. " + "Use simple words and a small example. " * 12}],
]
PLAIN = [
    "Once upon a time",
    "The three primary colours are",
    "def fibonacci(n):\n    ",
    "Paris is the capital of",
    "Q: What is 12 + 30?\nA:",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "In 1969, the first humans",
    "Ingredients for a simple pancake recipe:\n1.",
]


@pytest.fixture(scope="module")
def ours(smollm2_path):
    return pipeline("text-generation", model=smollm2_path)


@pytest.fixture(scope="module")
def reference(smollm2_path):
    folder, name = smollm2_path.parent, smollm2_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    return tokenizer, model


def _reference_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_greedy_tokens_equal_transformers_on_chat_and_plain_prompts(ours, reference):
    """16 prompts of mixed length (8 chats through the file's ChatML template, 8 plain, 4 to 250 tokens): the prompt
    ids and 48 greedy tokens each are identical to transformers' generate on the same GGUF file, all 16 run in one
    call (so through the continuous batch, mixed lengths together)."""
    tokenizer, model = reference
    prompts = CHATS + PLAIN
    answers = ours(prompts, max_new_tokens=NEW_TOKENS, do_sample=False, return_tensors=True)
    mismatched = []
    for prompt, answer in zip(prompts, answers):
        ids = _reference_ids(tokenizer, prompt)
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
        got = answer[0]["generated_token_ids"]
        if got != expected:
            mismatched.append((prompt, got[len(ids) :], expected[len(ids) :], got[: len(ids)] == ids))
    assert not mismatched, mismatched


def test_logits_equal_transformers(ours, reference, smollm2_path):
    """Full-sequence logits in float32 within 1e-3 of transformers' on the same file and prompt."""
    tokenizer, model = reference
    ids = torch.tensor([_reference_ids(tokenizer, CHATS[3])])
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids), model(ids).logits, rtol=0, atol=1e-3)


def test_default_text_generation_model_answers_offline(smollm2_path):
    """pipeline("text-generation") with no model resolves the bundled SmolLM2 GGUF through the offline Hub cache
    (imported as .ci/setup does) and answers the oracle's question as transformers does."""
    import_folder(smollm2_path, DEFAULT_CHAT_MODEL)
    chat = pipeline("text-generation")
    answer = chat(CHATS[0], max_new_tokens=40, do_sample=False)
    assert answer[0]["generated_text"][-1] == {"role": "assistant", "content": "The capital of France is Paris."}


def test_int4_keeps_the_files_grid_and_the_answer(smollm2_path):
    """quantization="int4" on the Q4_1 file: every projection of the 30 blocks is int4 on the file's own grid (its
    weights are the file's, exactly), the tied head stays the embedding table's, and the answer is the float32 one."""
    from pipelines.quantization import Int4Linear

    gen = pipeline("text-generation", model=smollm2_path, quantization="int4")
    int4 = [m for m in gen.model.modules() if isinstance(m, Int4Linear)]
    assert len(int4) == 30 * 7 and not isinstance(gen.model.lm_head, Int4Linear)
    answer = gen(CHATS[0], max_new_tokens=40, do_sample=False)
    assert answer[0]["generated_text"][-1] == {"role": "assistant", "content": "The capital of France is Paris."}

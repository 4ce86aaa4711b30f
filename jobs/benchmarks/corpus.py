"""A deterministic English-like corpus of mixed-length texts: the benchmarks' workloads and the bundled sample.

    python -m jobs.benchmarks.corpus --rows 10000 --out jobs/data/sample_corpus.jsonl   # the bundled sample (seed 0)

`make_corpus(rows, seed)` is the same list of texts on every run and machine (it draws from `random.Random(seed)`
only), so a benchmark's workload is named by its row count and seed. The bundled sample is this module's output
as written above (tests/jobs/test_benchmarks.py checks it).
"""

from __future__ import annotations

import argparse
import json
import random

SUBJECTS = [
    "the engineer",
    "a small team",
    "our model",
    "the customer",
    "this restaurant",
    "the new phone",
    "every student",
    "the city council",
    "a quiet village",
    "the research group",
    "my neighbour",
    "the orchestra",
    "an old library",
    "the football club",
    "the museum",
    "a startup in Berlin",
]
VERBS = [
    "builds",
    "reviews",
    "describes",
    "improves",
    "questions",
    "celebrates",
    "ignores",
    "measures",
    "explains",
    "recommends",
    "criticises",
    "delivers",
    "tests",
    "compares",
    "remembers",
    "announces",
]
OBJECTS = [
    "a distributed system",
    "the quarterly report",
    "an unexpected result",
    "the long winter",
    "a fresh pasta dish",
    "the battery life",
    "their first concert",
    "a complicated proof",
    "the opening ceremony",
    "a handwritten letter",
    "the train schedule",
    "a better tokenizer",
    "the summer festival",
    "an electric bicycle",
    "the price of coffee",
    "a forgotten manuscript",
]
ADVERBS = [
    "quickly",
    "carefully",
    "surprisingly well",
    "without much noise",
    "with great enthusiasm",
    "after a long delay",
    "despite the rain",
    "on a Tuesday morning",
    "for the third time",
    "in front of everyone",
    "with some hesitation",
    "better than expected",
]
OPINIONS = [
    "It was absolutely wonderful.",
    "Honestly, it was a disappointment.",
    "Nobody expected that.",
    "I would do it again.",
    "The results speak for themselves.",
    "Some people were not convinced.",
    "What a remarkable day!",
    "It could have been worse.",
    "Naïve plans rarely survive contact.",
    "Prices went up by 12% last year.",
    "Café owners were thrilled.",
    "Is this the future?",
]


def sentence(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return rng.choice(OPINIONS)
    subject = rng.choice(SUBJECTS)
    parts = [subject[0].upper() + subject[1:], rng.choice(VERBS), rng.choice(OBJECTS)]
    if rng.random() < 0.6:
        parts.append(rng.choice(ADVERBS))
    return " ".join(parts) + rng.choice([".", ".", ".", "!", "?"])


def text(rng: random.Random, min_words: int = 5, max_words: int = 200) -> str:
    """A text of min_words..max_words words; lengths skewed short, as real corpora are."""
    target = min(max_words, max(min_words, int(rng.paretovariate(1.3) * min_words * 1.2)))
    words: list[str] = []
    while len(words) < target:
        words.extend(sentence(rng).split())
    return " ".join(words[:target])


def make_corpus(rows: int, seed: int = 0, min_words: int = 5, max_words: int = 200) -> list[str]:
    """`rows` texts of min_words..max_words words, the same for the same arguments."""
    rng = random.Random(seed)
    return [text(rng, min_words, max_words) for _ in range(rows)]


def write_jsonl(path, rows: int, seed: int = 0) -> None:
    """`make_corpus(rows, seed)` as JSON lines `{"id": i, "text": ...}`: the input format of jobs.infer and jobs.embed."""
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(make_corpus(rows, seed)):
            f.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    write_jsonl(args.out, args.rows, args.seed)


if __name__ == "__main__":
    main()

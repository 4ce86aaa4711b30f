"""question-answering: answer spans of a context for a question, as transformers 4.57's QuestionAnsweringPipeline
(transformers 5 removed it; tests/data/qa_reference/ holds its outputs).

The (question, context) pair is tokenized with the question first; a pair longer than `max_seq_len` tokens is
cut into windows of the context overlapping by `doc_stride` tokens, each window one chunk, and the chunks of
many inputs are batched together. Per chunk, the start and end logits of tokens outside the context (except
the CLS token) are set to -10000, both are softmaxed in float32, and a span scores p(start) * p(end).
"""

from __future__ import annotations

import torch

from pipelines.base import ChunkPipeline

PARAMETERS = (
    "top_k",
    "doc_stride",
    "max_answer_len",
    "max_seq_len",
    "max_question_len",
    "handle_impossible_answer",
    "align_to_words",
)
DEFAULT_MAX_SEQ_LEN = 384
_MASKED = -10000.0  # the logit transformers gives tokens that cannot be part of an answer
_UNSET = object()


class QuestionAnsweringPipeline(ChunkPipeline):
    """Per input {"score", "start", "end", "answer"}: `answer` is `context[start:end]`.

    Inputs: `pipe(question=..., context=...)` with two strings, a list of questions and one context, or two
    lists of the same length; `pipe({"question": ..., "context": ...})`, a list or a generator of such dicts;
    or `pipe(question, context)`. As in transformers, a list of ONE input returns one answer, not a list.
    Output: one dict when one answer is left, otherwise a list of up to `top_k` dicts, best first.

    Parameters (transformers' names and defaults): `top_k` (1); `max_answer_len` (15 tokens); `max_seq_len`
    (min(384, model window)); `doc_stride` (min(max_seq_len // 2, 128)); `handle_impossible_answer` (False:
    True adds {"answer": ""} scored by the lowest p(CLS start) * p(CLS end) over the chunks);
    `align_to_words` (True: an answer is widened to whole words within its chunk). The best
    `2 * top_k + 10` spans per chunk (`top_k` without word alignment) are kept, and answers with the same text
    (any case) add up their scores, keeping the first one's offsets.
    `max_question_len` is accepted and, as in transformers with fast tokenizers, not applied.

    Deviation: transformers fills its span shortlist with score-0 spans (ending before they start, longer
    than `max_answer_len`, or starting at CLS: answers "" or wrong prefixes) when a chunk has fewer valid
    spans than the shortlist; which ones depends on numpy's argpartition tie order. Only valid spans are
    kept here, so such score-0 entries never appear. A question too long for `max_seq_len`, or a
    `doc_stride` not smaller than the context room of a chunk, is a ValueError (transformers: a `tokenizers`
    error or panic).
    """

    task = "question-answering"
    token_outputs = ("logits",)

    def _sanitize_parameters(
        self,
        top_k=None,
        doc_stride=None,
        max_answer_len=None,
        max_seq_len=None,
        max_question_len=None,
        handle_impossible_answer=None,
        align_to_words=None,
        **unknown,
    ):
        if unknown:
            raise TypeError(
                f"question-answering got unknown parameters {sorted(unknown)}; allowed: {', '.join(PARAMETERS)}"
            )
        pre, post = {}, {}
        if max_seq_len is not None:
            pre["max_seq_len"] = _integer("max_seq_len", max_seq_len, 1)
            if self.max_length is not None and max_seq_len > self.max_length:
                raise ValueError(
                    f"max_seq_len={max_seq_len} is more than the model's maximum of {self.max_length} tokens"
                )
        if doc_stride is not None:
            pre["doc_stride"] = _integer("doc_stride", doc_stride, 0)
        if max_question_len is not None:
            _integer("max_question_len", max_question_len, 1)  # validated, not applied: see the class docstring
        if top_k is not None:
            post["top_k"] = _integer("top_k", top_k, 1)
        if max_answer_len is not None:
            post["max_answer_len"] = _integer("max_answer_len", max_answer_len, 1)
        for name, value in (("handle_impossible_answer", handle_impossible_answer), ("align_to_words", align_to_words)):
            if value is not None:
                if not isinstance(value, bool):
                    raise TypeError(f"{name} must be True or False, got {value!r}")
                post[name] = value
        return pre, {}, post

    def __call__(self, *args, question=_UNSET, context=_UNSET, **kwargs):
        inputs = _gather_inputs(args, question, context)
        if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
            inputs = inputs[0]  # transformers answers a one-item list with a single answer
        return super().__call__(inputs, **kwargs)

    def preprocess(self, item, max_seq_len=None, doc_stride=None):
        question, context = _question_context(item)
        if max_seq_len is None:
            max_seq_len = min(DEFAULT_MAX_SEQ_LEN, self.max_length or DEFAULT_MAX_SEQ_LEN)
        if doc_stride is None:
            doc_stride = min(max_seq_len // 2, 128)
        if doc_stride > max_seq_len:
            raise ValueError(f"doc_stride ({doc_stride}) is larger than max_seq_len ({max_seq_len})")
        cls_id = self.tokenizer.token_id("cls_token")
        for enc in self._windows(question, context, max_seq_len, doc_stride):
            # the context, and the CLS token (the "no answer" position), may hold the answer's ends
            allowed = [seq == 1 or token == cls_id for seq, token in zip(enc.sequence_ids, enc.input_ids)]
            yield {
                **enc.model_inputs(),
                "allowed": allowed,
                "offsets": enc.offsets,
                "word_ids": enc.word_ids,
                "sequence_ids": enc.sequence_ids,
                "context": context,
            }

    def _windows(self, question: str, context: str, max_seq_len: int, doc_stride: int) -> list:
        """The question with each window of the context, checked first so that `tokenizers` cannot panic."""
        full = self.tokenizer.encode(question, context)
        if len(full) <= max_seq_len:
            return [full]
        room = max_seq_len - (len(full) - full.sequence_ids.count(1))  # context tokens that fit in a chunk
        if room < 1:
            raise ValueError(
                f"the question and special tokens take {len(full) - full.sequence_ids.count(1)} tokens, "
                f"leaving no room for the context within max_seq_len={max_seq_len}; "
                "shorten the question or raise max_seq_len"
            )
        if doc_stride >= room:
            raise ValueError(
                f"doc_stride={doc_stride} must be smaller than the {room} context tokens that fit in a "
                f"chunk next to the question (max_seq_len={max_seq_len}); lower doc_stride"
            )
        return self.tokenizer.encode(
            question,
            context,
            max_length=max_seq_len,
            stride=doc_stride,
            truncation="only_second",
            return_overflowing=True,
        )

    def _forward(self, inputs):
        return {"logits": self.model(**inputs).float()}  # (B, T, 2): start, end

    def postprocess(self, parts, top_k=1, handle_impossible_answer=False, max_answer_len=15, align_to_words=True):
        shortlist = top_k * 2 + 10 if align_to_words else top_k  # word alignment merges some spans
        answers, null_score = [], 1000000.0
        for part in parts:
            spans, part_null = _best_spans(part["logits"], part["allowed"], shortlist, max_answer_len)
            null_score = min(null_score, part_null)
            for s, e, score in spans:
                start, end = _char_span(part, s, e, align_to_words)
                _add_answer(answers, part["context"], start, end, score)
        if handle_impossible_answer:
            answers.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
        return answers[0] if len(answers) == 1 else answers


def _gather_inputs(args: tuple, question, context):
    """The inputs of a call as one dict, a list of dicts, or what was passed positionally."""
    if args and (question is not _UNSET or context is not _UNSET):
        raise TypeError("pass the inputs either positionally or as question=/context=, not both")
    if len(args) == 1:
        return args[0]
    if len(args) == 2 and all(isinstance(a, str) for a in args):
        return {"question": args[0], "context": args[1]}
    if args:
        raise TypeError(
            f"expected one input (a dict or a list of dicts) or (question, context) strings, "
            f"got {len(args)} positional arguments"
        )
    for name, value in (("question", question), ("context", context)):
        if value is _UNSET:
            raise ValueError(f"question-answering needs question= and context=; {name} is missing")
    if isinstance(question, list):
        if not isinstance(context, list):
            return [{"question": q, "context": context} for q in question]  # one context for every question
        if len(question) != len(context):
            raise ValueError(
                f"got {len(question)} questions and {len(context)} contexts: the lists must have the same length"
            )
        return [{"question": q, "context": c} for q, c in zip(question, context)]
    if isinstance(context, list):
        raise ValueError(
            "one question with a list of contexts is not supported (nor in transformers): "
            "pass question= as a list of the same length"
        )
    return {"question": question, "context": context}


def _question_context(item) -> tuple[str, str]:
    if not isinstance(item, dict):
        raise TypeError(
            f"a question-answering input is a dict {{'question': ..., 'context': ...}}, got {type(item).__name__}"
        )
    if set(item) - {"question", "context"}:
        raise ValueError(f"unknown keys {sorted(set(item) - {'question', 'context'})}; allowed: 'question', 'context'")
    for key in ("question", "context"):
        if item.get(key) is None:
            raise ValueError(f"the input has no {key!r}: a question-answering input needs 'question' and 'context'")
        if not isinstance(item[key], str):
            raise TypeError(f"{key} must be a string, got {type(item[key]).__name__}")
        if not item[key]:
            raise ValueError(f"{key} is empty")
    return item["question"], item["context"]


def _best_spans(logits: torch.Tensor, allowed: list[bool], k: int, max_answer_len: int):
    """The k best (start, end, score) token spans of one chunk, best first, and its null (CLS) score."""
    allowed = torch.tensor(allowed)
    probs = torch.softmax(logits.float().masked_fill(~allowed[:, None], _MASKED), dim=0)  # (T, 2)
    p_start, p_end = probs[:, 0], probs[:, 1]
    null_score = (p_start[0] * p_end[0]).item()
    allowed[0] = False  # as transformers: position 0 (CLS) gets probability 0, so it never starts or ends a span
    n = len(allowed)
    scores = p_start[:, None] * p_end[None, :]  # (T, T): start x end
    valid = torch.ones(n, n, dtype=torch.bool).triu().tril(max_answer_len - 1)  # start <= end < start + max_len
    valid &= allowed[:, None] & allowed[None, :]
    best = torch.topk(scores.masked_fill(~valid, -1.0).flatten(), min(k, int(valid.sum())))
    return [(i // n, i % n, s) for i, s in zip(best.indices.tolist(), best.values.tolist())], null_score


def _char_span(part: dict, s: int, e: int, align_to_words: bool) -> tuple[int, int]:
    """Character offsets in the context of tokens s..e, widened to their words as transformers'
    `enc.word_to_chars(enc.token_to_word(i), sequence_index=1)`; raw token offsets where that fails."""
    offsets = part["offsets"]
    if align_to_words:
        first, last = _word_chars(part, part["word_ids"][s]), _word_chars(part, part["word_ids"][e])
        if first is not None and last is not None:
            return first[0], last[1]
    return offsets[s][0], offsets[e][1]


def _word_chars(part: dict, word: int | None) -> tuple[int, int] | None:
    """(start, end) characters of `word` among this chunk's context tokens; None if it has none there."""
    if word is None:
        return None
    tokens = [i for i, (w, seq) in enumerate(zip(part["word_ids"], part["sequence_ids"])) if seq == 1 and w == word]
    return (part["offsets"][tokens[0]][0], part["offsets"][tokens[-1]][1]) if tokens else None


def _add_answer(answers: list[dict], context: str, start: int, end: int, score: float) -> None:
    """Append the answer, or add its score to an earlier one with the same text, any case (as transformers)."""
    text = context[start:end]
    for answer in answers:
        if answer["answer"].lower() == text.lower():
            answer["score"] += score
            return
    answers.append({"score": score, "start": start, "end": end, "answer": text})


def _integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value

"""text-generation: a prompt (or a chat) in, generated text out, with transformers' parameters and outputs.

    gen = pipeline("text-generation", model="...")
    gen("Once upon a time", max_new_tokens=20, do_sample=False)  # [{"generated_text": "Once upon a time..."}]
    gen([{"role": "user", "content": "Hi"}])                      # [{"generated_text": [..., {"role": "assistant", ...}]}]
    for piece in gen.stream("Once upon a time", max_new_tokens=20): ...   # text as it is generated

Parameters, with transformers' names and resolution (pipelines/generation/sampling.py): max_new_tokens, max_length,
min_new_tokens, min_length, do_sample, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size,
num_return_sequences, eos_token_id, stop_strings (or stop_sequence), seed; the checkpoint's generation_config.json
gives the defaults, then the pipeline's own (max_new_tokens=256, do_sample=True, temperature=0.7), as in
transformers. Outputs: `generated_text` (the prompt plus the new text, or the new text alone with
return_full_text=False; for a chat, the conversation with the assistant's answer), or `generated_token_ids` with
return_tensors=True. With stop strings the text ends with the token that completed one, as in transformers.

The model step runs on the continuous-batching engine (pipelines/generation/engine.py) through one background loop per
pipeline (pipelines/generation/loop.py): every prompt of a call, and of concurrent calls from other threads, shares the
running batch, and each sequence leaves it as soon as it stops. Detokenisation happens in postprocess.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from pipelines.base import Features, Pipeline
from pipelines.generation import chat
from pipelines.generation.sampling import GenerationParams, StopStrings, checkpoint_defaults, sampler_state, select

_PRE = ("add_special_tokens", "continue_final_message", "chat_template", "prefix")
_POST = ("return_full_text", "return_text", "return_tensors", "clean_up_tokenization_spaces")


class TextGenerationPipeline(Pipeline):
    task = "text-generation"
    model_input_names = ("input_ids",)
    # batch_size: sequences running at once in the engine; max_batch_tokens: prompt tokens prefilled per step
    budget_defaults = ("max_sequences", "prefill_tokens")

    def __init__(self, model, tokenizer, *, config: dict | None = None, model_path=None, **params):
        self.generation_defaults = checkpoint_defaults(model_path) if model_path is not None else dict(config or {})
        self.templates = (
            chat.ChatTemplate.from_pretrained(model_path) if model_path is not None else chat.ChatTemplate()
        )
        super().__init__(model, tokenizer, config=config, model_path=model_path, **params)
        self._loop = None
        self._loop_lock = threading.Lock()

    # -- parameters ---------------------------------------------------------------------------------------------
    def _sanitize_parameters(self, **params) -> tuple[dict, dict, dict]:
        pre = {k: params.pop(k) for k in _PRE if k in params}
        post = {k: params.pop(k) for k in _POST if k in params}
        if "stop_sequence" in params:  # the pipeline's name for stop strings
            params["stop_strings"] = params.pop("stop_sequence")
        if post.get("return_text") is not None and post.get("return_full_text") is not None:
            raise ValueError("return_text and return_full_text are mutually exclusive: give one of them")
        if post.get("return_text") is not None and post.get("return_tensors"):
            raise ValueError("return_text and return_tensors are mutually exclusive: give one of them")
        if pre.get("prefix") is not None and not isinstance(pre["prefix"], str):
            raise TypeError(f"prefix must be a string, got {type(pre['prefix']).__name__}")
        GenerationParams.resolve(
            self.generation_defaults, max_context=self.max_length, **params
        )  # checks names, values
        return pre, params, post

    # -- preprocess: a prompt or a chat -> prompt ids -------------------------------------------------------------
    def _is_single(self, inputs) -> bool:
        return isinstance(inputs, (str, bytes)) or chat.is_chat(inputs)

    def preprocess(
        self,
        item,
        add_special_tokens: bool | None = None,
        continue_final_message: bool | None = None,
        chat_template: str | None = None,
        prefix: str | None = None,
    ) -> Features:
        if chat.is_chat(item):
            messages = chat.check_messages(item)
            text = chat.chat_prompt(
                self.templates, messages, continue_final_message=continue_final_message, chat_template=chat_template
            )
            ids = chat.encode_chat_prompt(self.tokenizer, text).input_ids
            prompt = {"messages": messages, "continue_final_message": continue_final_message}
        elif isinstance(item, str):
            if not item:
                raise ValueError("the prompt is empty: give the text to continue (or a chat)")
            text = (prefix or "") + item
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens is not False).input_ids
            prompt = {"prompt_text": item}
        else:
            if isinstance(item, dict) and "role" in item:  # a message outside a list, or one without content
                chat.check_messages([item])
            raise TypeError(
                f"expected a prompt string or a chat (a list of {{'role', 'content'}} dicts), got {type(item).__name__}"
            )
        if not ids:
            raise ValueError("the prompt is empty (no tokens): generation needs at least one token to continue")
        if self.max_length is not None and len(ids) >= self.max_length:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the model's context is {self.max_length} "
                "tokens: no room left to generate; shorten the prompt"
            )
        return {"input_ids": ids, **prompt}

    # -- the model step: the engine -------------------------------------------------------------------------------
    @property
    def loop(self):
        """The background engine loop of this pipeline's model, started on first use."""
        if self.model is None:
            raise RuntimeError(
                "this TextGenerationPipeline was built without weights: it can preprocess and postprocess only"
            )
        with self._loop_lock:
            if self._loop is None:
                from pipelines.generation.engine import Engine
                from pipelines.generation.loop import EngineLoop

                engine = Engine(
                    self.model,
                    select=select,
                    max_sequences=self.batch_size,
                    max_batch_tokens=self.max_batch_tokens,
                    kv_cache_tokens=self.runtime.kv_cache_tokens,
                    max_length=self.max_length,
                )
                self._loop = EngineLoop(engine)
            return self._loop

    def requests(self, features: list[Features], params: dict) -> list[list[dict]]:
        """Per features dict, the engine requests of its num_return_sequences sequences."""
        resolved = GenerationParams.resolve(self.generation_defaults, max_context=self.max_length, **params)
        stop = StopStrings(self.tokenizer, resolved.stop_strings) if resolved.stop_strings else None
        out = []
        for f in features:
            ids = list(f["input_ids"])
            states = [
                sampler_state(resolved, len(ids), index=r, stop=stop) for r in range(resolved.num_return_sequences)
            ]
            out.append(
                [
                    dict(
                        prompt_ids=ids,
                        max_new_tokens=s.max_new_tokens,
                        eos_token_ids=resolved.eos_token_id,
                        stop=stop.after(ids) if stop else None,
                        sampler_state=s,
                    )
                    for s in states
                ]
            )
        return out

    def run_model(self, features, *, batch_size=None, max_batch_tokens=None, params=None) -> list[dict]:
        """The generated ids and finish reason of each sequence of each features dict, in order."""
        params = self.call_parameters().forward if params is None else params
        per_feature = self.requests(list(features), params)
        flat = [r for requests in per_feature for r in requests]
        results, outputs, start = self.loop.generate(flat), [], 0
        for requests in per_feature:
            mine = results[start : start + len(requests)]
            start += len(requests)
            outputs.append({"generated_ids": [ids for ids, _ in mine], "finish_reasons": [why for _, why in mine]})
        return outputs

    # -- postprocess: ids -> text ----------------------------------------------------------------------------------
    def postprocess(
        self,
        outputs: Features,
        return_full_text: bool | None = None,
        return_text: bool | None = None,
        return_tensors: bool | None = None,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[dict]:
        """One dict per returned sequence: generated_token_ids (prompt + new ids) with return_tensors, else
        generated_text: the prompt (or the chat) with the new text, or the new text alone (return_full_text=False)."""
        tensors = bool(return_tensors) and return_full_text is None
        full = return_full_text is not False
        answers = []
        for ids in outputs["generated_ids"]:
            ids = [int(t) for t in ids]
            if tensors:
                answers.append({"generated_token_ids": [int(t) for t in outputs["input_ids"]] + ids})
                continue
            new = self.decode(ids, clean_up_tokenization_spaces)
            answers.append({"generated_text": self._full_text(outputs, new) if full else new})
        return answers

    def decode(self, ids: list[int], clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of generated ids, special tokens skipped; clean-up as the tokenizer config says unless given."""
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=clean_up_tokenization_spaces
        )

    def _full_text(self, outputs: Features, new: str):
        if outputs.get("messages") is not None:
            return chat.chat_reply(outputs["messages"], new, outputs.get("continue_final_message"))
        return outputs["prompt_text"] + new

    # -- streaming ---------------------------------------------------------------------------------------------------
    def stream(self, item, **params) -> Iterator[str]:
        """The new text of one prompt (or chat) piece by piece as the engine generates it; the pieces join to the
        `generated_text` of return_full_text=False. One sequence (num_return_sequences=1)."""
        from pipelines.generation.streaming import TextStream

        pre, fwd, _ = self.call_parameters(**params)
        (request,) = self.requests(self.preprocess_item(item, 0, pre), {**fwd, "num_return_sequences": 1})[0]
        events: queue.Queue = queue.Queue()
        seq_id = self.loop.submit(on_event=events.put, **request)
        text = TextStream(self.decode)
        try:
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                piece = text.push(event.token_id)
                if piece:
                    yield piece
                if event.finished:
                    break
            rest = text.flush()
            if rest:
                yield rest
        finally:
            self.loop.cancel(seq_id)

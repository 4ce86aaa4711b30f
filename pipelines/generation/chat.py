"""Chat templates: a conversation rendered to prompt text exactly as transformers' `apply_chat_template`, and the
rules of its text-generation pipeline for chats (what counts as a chat, how it is tokenized, what comes back).

Where transformers 5 finds a tokenizer's templates: `chat_template.jinja` (the default template) and
`additional_chat_templates/<name>.jinja` (named ones); only when neither exists, `chat_template` in
tokenizer_config.json (a string, or a list of {"name", "template"}). `chat_template.json` belongs to processors
(multimodal models) and is not read for a tokenizer, so not here either. Several templates make a dict: the one
named by `chat_template=`, else "tool_use" when tools are given, else "default".

Templates are untrusted code from the Hub: they run in jinja2's ImmutableSandboxedEnvironment with transformers'
options (trim_blocks, lstrip_blocks, the loopcontrols extension and a `{% generation %}` block), globals
(`raise_exception`, `strftime_now`, a restricted `dict` and `namespace`) and `tojson` filter, and see only plain
JSON-like copies of the messages. The tokenizer's special tokens (bos_token, eos_token, ...) are template variables.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipelines.gguf import GGUFCheckpoint

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
_STANDARD_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the first is the one templates read
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_EXAMPLE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer's chat template(s) and special tokens. `templates` is one Jinja source, a dict of named sources,
    or None (the tokenizer has none: `render` then needs `chat_template=`)."""

    templates: str | dict[str, str] | None = None
    special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        templates = self.templates
        if isinstance(templates, (list, tuple)):  # tokenizer_config.json's [{"name": ..., "template": ...}, ...]
            templates = {t["name"]: t["template"] for t in templates}
            object.__setattr__(self, "templates", templates)
        if not (
            templates is None
            or isinstance(templates, str)
            or (isinstance(templates, dict) and all(isinstance(v, str) for v in templates.values()))
        ):
            raise TypeError(
                f"chat templates must be a string or a dict of named strings, got {type(templates).__name__}"
            )

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ChatTemplate:
        """The templates and special tokens of a tokenizer folder, from where transformers 5 reads them."""
        folder = Path(folder)
        if folder.suffix == ".gguf" and folder.is_file():  # the metadata's template and special tokens
            checkpoint = GGUFCheckpoint.open(folder)
            return cls(checkpoint.chat_template, checkpoint.special_tokens())
        config = _read_json(folder / "tokenizer_config.json")
        files = {}
        if (folder / TEMPLATE_FILE).is_file():
            files["default"] = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
        if (folder / TEMPLATE_DIR).is_dir():
            for path in sorted((folder / TEMPLATE_DIR).glob("*.jinja")):
                files[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
        if files:  # template files replace any template of tokenizer_config.json
            templates = files["default"] if list(files) == ["default"] else files
        else:
            templates = config.get("chat_template")
        return cls(templates, special_tokens_of(folder))

    def template(self, chat_template: str | None = None, tools=None) -> str:
        """The Jinja source to use: a template name or source given as `chat_template`, else the tokenizer's."""
        if isinstance(self.templates, dict):
            if chat_template is not None:
                return self.templates.get(chat_template, chat_template)
            if tools is not None and "tool_use" in self.templates:
                return self.templates["tool_use"]
            if "default" in self.templates:
                return self.templates["default"]
            raise ValueError(
                "this tokenizer has several chat templates and none named 'default': choose one with "
                f"chat_template=NAME; names: {sorted(self.templates)}"
            )
        if chat_template is not None:
            return chat_template
        if self.templates is None:
            raise ValueError(
                "this tokenizer has no chat template (no chat_template.jinja and no chat_template in "
                f"tokenizer_config.json): pass a Jinja template as chat_template=, e.g. {_EXAMPLE!r}, "
                "or give a plain string prompt instead of messages"
            )
        return self.templates

    def render(
        self,
        messages,
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **variables,
    ) -> str:
        """The prompt text of one conversation (`tokenize=False` in transformers). `continue_final_message` leaves
        the last message open (its field "content", or the one named) for the model to continue; `variables` are
        extra template variables and override the special tokens."""
        source = self.template(chat_template, tools)
        chat = [{k: v for k, v in m.items() if v is not None} for m in check_messages(messages)]
        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt cannot both be set: continue the last "
                "message, or start a new assistant message"
            )
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise TypeError(f"tools must be a list of JSON schema dicts, got {tools!r}")
        if documents is not None and not (isinstance(documents, list) and all(isinstance(d, dict) for d in documents)):
            raise TypeError(f"documents must be a list of dicts with 'title' and 'text', got {documents!r}")
        chat = _alias_reasoning(_plain(chat))
        final = None
        if continue_final_message:
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            final = _tag_final_message(chat, field, source)
        variables = _plain({**self.special_tokens, **variables})
        text = _render(
            _compile(source),
            messages=chat,
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
        return text if final is None else _cut_at_tag(text, final)


def special_tokens_of(folder: str | Path) -> dict[str, str]:
    """The special tokens transformers 5 passes to templates: tokenizer_config.json's bos_token ... mask_token
    (strings or {"content": ...}) and its other "*_token" strings; special_tokens_map.json overrides them in legacy
    folders (no "added_tokens_decoder" in the config), as transformers does."""
    folder = Path(folder)
    config = _read_json(folder / "tokenizer_config.json")
    sources = [config] if "added_tokens_decoder" in config else [config, _read_json(folder / "special_tokens_map.json")]
    tokens: dict[str, str] = {}
    for source in sources:
        extra = source.get("extra_special_tokens")
        for key, value in {**source, **(extra if isinstance(extra, dict) else {})}.items():
            if isinstance(value, dict):  # an AddedToken as {"content": ..., "lstrip": ...}
                value = value.get("content")
            if isinstance(value, str) and (key in _STANDARD_TOKENS or key.endswith("_token")):
                tokens[key] = value
    return tokens


# -- the text-generation pipeline's chat rules -------------------------------------------------------------------
def is_message(item) -> bool:
    """A chat message as the pipeline recognises one: a dict with "role" and "content" keys."""
    return isinstance(item, dict) and "role" in item and "content" in item


def is_chat(item) -> bool:
    """One conversation: a list (or tuple) whose first element is a message. A list of strings is a batch of prompts."""
    return isinstance(item, (list, tuple)) and len(item) > 0 and is_message(item[0])


def is_chat_batch(items) -> bool:
    """Several conversations: a list whose every element is a conversation (transformers' rule)."""
    return isinstance(items, (list, tuple)) and len(items) > 0 and all(is_chat(c) for c in items)


def check_messages(messages) -> list[dict]:
    """`messages` as a list of message dicts; TypeError / ValueError naming the first bad one."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"a chat must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("a chat needs at least one message, got an empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"chat message #{i} must be a dict with 'role' and 'content', got {message!r}")
        missing = [k for k in ("role", "content") if k not in message]
        if missing:
            raise ValueError(f"chat message #{i} lacks {' and '.join(repr(k) for k in missing)}: {message!r}")
        if not isinstance(message["role"], str):
            raise TypeError(f"chat message #{i}: role must be a string such as 'user', got {message['role']!r}")
    return list(messages)


def continues_final_message(messages, continue_final_message: bool | None = None) -> bool:
    """The pipeline's default: a chat that ends with an assistant message is a prefill to continue."""
    if continue_final_message is not None:
        return bool(continue_final_message)
    return check_messages(messages)[-1]["role"] == "assistant"


def chat_prompt(template: ChatTemplate, messages, *, continue_final_message: bool | None = None, **kwargs) -> str:
    """The prompt text the text-generation pipeline builds for a chat: a generation prompt for a new assistant
    message, or the final message left open when continuing it. Tokenize it with `encode_chat_prompt`."""
    cont = continues_final_message(messages, continue_final_message)
    return template.render(messages, add_generation_prompt=not cont, continue_final_message=cont, **kwargs)


def encode_chat_prompt(tokenizer, text: str, **kwargs):
    """The prompt's tokens: the template wrote the special tokens itself, so none are added (transformers tokenizes
    the rendered chat with add_special_tokens=False; special tokens written as text are matched as such)."""
    return tokenizer.encode(text, add_special_tokens=False, **kwargs)


def chat_reply(messages, new_text: str, continue_final_message: bool | None = None) -> list[dict]:
    """`generated_text` of a chat answer with return_full_text (the default): the conversation plus an assistant
    message holding the new text, or, when continuing, the final message with the new text appended."""
    messages = check_messages(messages)
    if continues_final_message(messages, continue_final_message):
        last = messages[-1]
        return [*messages[:-1], {"role": last["role"], "content": last["content"] + new_text}]
    return [*messages, {"role": "assistant", "content": new_text}]


# -- rendering -------------------------------------------------------------------------------------------------------
class _TemplateRaised(Exception):
    """Raised by a template's raise_exception(message)."""


def _render(template, **context) -> str:
    try:
        return template.render(**context)
    except _TemplateRaised as e:
        raise ValueError(f"the chat template rejected the conversation: {e}") from e
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"the chat template failed to render: {type(e).__name__}: {e}") from e


@lru_cache(maxsize=32)
def _compile(source: str):
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja: {e.message} (line {e.lineno})") from e


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """transformers' sandbox: the same options, extensions, globals and filters."""
    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        raise ImportError(
            f"chat templates need jinja2>=3.1.6 (older ones have sandbox escapes), found {jinja2.__version__}"
        )
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; its body is kept."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore names (no way to reach CPython internals)."""

    def __init__(*args, **kwargs):  # jinja's signature trick, so that namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes, got {name!r}")


def _raise_exception(message):
    raise _TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson: plain json.dumps (jinja's own escapes HTML characters), with its options exposed."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """dict() for templates without attribute access to the real class."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _plain(value: Any) -> Any:
    """A copy made of plain JSON types only (str, int, float, bool, None, dict, list, tuple), as transformers gives
    templates; other objects become an inert "<TypeName>" placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (bool, str, int, float):  # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, kind):
            return kind(value) if kind is not str else str.__str__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    """A message's reasoning under any of its names is also given as `reasoning_content` and `thinking`."""
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        out.append(message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning})
    return out


def _tag_final_message(chat: list[dict], field: str, source: str) -> str:
    """Mark the end of the last message's `field` so the rendered text can be cut there; returns that text."""
    final = chat[-1].get(field)
    if final is None:
        raise ValueError(f"continue_final_message is set but the final message has no {field!r} to continue")
    fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final] if field in _REASONING_FIELDS else [field]
    if not any(f in source for f in fields):
        raise ValueError(f"continue_final_message is set to {field!r}, a field the chat template does not use")
    if isinstance(final, (list, tuple)):  # content blocks: continue the last text block
        for block in reversed(final):
            if isinstance(block, dict) and "text" in block:
                text, block["text"] = block["text"], block["text"] + _CONTINUE_TAG
                return text
        raise ValueError("continue_final_message is set but the final message has no text block to continue")
    for f in fields:
        chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    return final


def _cut_at_tag(text: str, final: str) -> str:
    if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise ValueError(
            "continue_final_message is set but the chat template dropped part of the final message "
            f"{final.strip()[:80]!r}; this template cannot continue it"
        )
    at = text.rindex(_CONTINUE_TAG.strip())
    if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()  # the template trimmed the message's trailing space, and so the tag's


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)

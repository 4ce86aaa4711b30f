"""Chat templates render as transformers' apply_chat_template; the text-generation pipeline's chat rules."""

import json

import pytest
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from pipelines.generation.chat import (
    ChatTemplate,
    chat_prompt,
    chat_reply,
    check_messages,
    continues_final_message,
    encode_chat_prompt,
    is_chat,
    is_chat_batch,
    special_tokens_of,
)
from pipelines.tokenization import Tokenizer as OurTokenizer

CHATML = (  # Qwen2 style: a default system message, <|im_start|> blocks
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (  # bos_token from the tokenizer, trimmed content
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (  # raise_exception on role alternation
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
TOOLS = """{{- bos_token }}
{%- set date_string = strftime_now("%d %b %Y") %}
<|system|>Today is {{ date_string }}.
{%- if tools is not none %}
Tools:
{%- for t in tools %}
{{ t | tojson(indent=2) }}
{%- endfor %}
{%- endif %}
{%- set ns = namespace(count=0) %}
{%- for message in messages %}
    {%- set ns.count = ns.count + 1 %}
<|{{ message.role }}|>{{ message.content | tojson }}{% if message.reasoning_content is defined %} \
[{{ message.reasoning_content }}]{% endif %}
    {%- if message.role == 'assistant' %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}
{%- endfor %}
{{ ns.count }} messages{{ dict(a=1) | tojson }}{% if enable_thinking is defined and not enable_thinking %} no-think\
{% endif %}
{%- if add_generation_prompt %}
<|assistant|>
{%- endif %}"""
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "zephyr": ZEPHYR, "tools": TOOLS}
SPECIALS = [
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
]

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "What is the capital of France? <b>Café</b>"}
ASSISTANT = {"role": "assistant", "content": "Paris.  "}
CHATS = {
    "single": [USER],
    "system": [SYSTEM, USER],
    "multi-turn": [USER, ASSISTANT, {"role": "user", "content": "And of Italy?"}],
    "ends-with-assistant": [SYSTEM, USER, {"role": "assistant", "content": "The capital is"}],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def tokenizer_json():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [USER["content"], ASSISTANT["content"], SYSTEM["content"], "You are a helpful assistant. Italy"] * 3
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok.to_str()


@pytest.fixture
def folder(tmp_path, tokenizer_json):
    """A new tokenizer folder with `template` (None: none) in tokenizer_config.json, plus any `files`."""

    def make(template=None, files=None, **config):
        path = tmp_path / f"tokenizer-{len(list(tmp_path.iterdir()))}"
        path.mkdir()
        (path / "tokenizer.json").write_text(tokenizer_json)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", **config}
        if template is not None:
            config["chat_template"] = template
        (path / "tokenizer_config.json").write_text(json.dumps(config))
        for name, text in (files or {}).items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(text)
        return path

    return make


def _both(path, messages, **kwargs):
    """(ours, transformers') rendering of `messages`; a template error is compared as its message."""
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    try:
        want = hf.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # jinja2's TemplateError from raise_exception, or a transformers ValueError
        with pytest.raises(ValueError) as caught:
            ChatTemplate.from_pretrained(path).render(messages, **kwargs)
        return str(caught.value), str(e)
    return ChatTemplate.from_pretrained(path).render(messages, **kwargs), want


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_render_as_transformers(folder, name):
    """Real-world templates, system messages, multi-turn, with and without the generation prompt."""
    path = folder(TEMPLATES[name])
    for chat_name, messages in CHATS.items():
        for add in (False, True):
            ours, want = _both(path, messages, add_generation_prompt=add)
            if name == "mistral" and chat_name in ("system", "ends-with-assistant"):  # no system role: both raise
                assert ours == f"the chat template rejected the conversation: {want}"
                assert want == "Conversation roles must alternate user/assistant/user/assistant/..."
            else:
                assert ours == want, (name, chat_name, add)


def test_mistral_alternation_error(folder):
    """A template's own raise_exception (Mistral's role alternation) reaches the caller with transformers' message."""
    path = folder(MISTRAL)
    ours, want = _both(path, [USER, USER])
    assert ours == (
        "the chat template rejected the conversation: "
        "Conversation roles must alternate user/assistant/user/assistant/..."
    )
    assert want == "Conversation roles must alternate user/assistant/user/assistant/..."


def test_continue_final_message_as_transformers(folder):
    """continue_final_message renders each template as transformers does, ending in the open assistant turn."""
    for template in (CHATML, LLAMA3, ZEPHYR, TOOLS):
        path = folder(template)
        ours, want = _both(path, CHATS["ends-with-assistant"], continue_final_message=True)
        assert ours == want and ours.rstrip().endswith("The capital is")


def test_tools_documents_variables_and_reasoning(folder):
    """tools as JSON schemas (tojson with indent), extra variables, None values dropped, reasoning aliases."""
    path = folder(TOOLS)
    messages = [USER, {"role": "assistant", "content": "Paris.", "reasoning": "easy", "tool_calls": None}]
    for kwargs in ({"tools": [WEATHER_TOOL]}, {"enable_thinking": False}, {"add_generation_prompt": True}):
        ours, want = _both(path, messages, **kwargs)
        assert ours == want, kwargs
    assert "\\u" not in ours and "Café" in ours and "<b>" in ours  # tojson: no ASCII or HTML escaping
    assert "[easy]" in ours


def test_template_files_named_templates_and_priority(folder):
    """chat_template.jinja and additional_chat_templates/*.jinja replace tokenizer_config.json's template; several
    templates are chosen by name, "tool_use" with tools, else "default"."""
    files = {
        "chat_template.jinja": CHATML,
        "additional_chat_templates/tool_use.jinja": TOOLS,
        "additional_chat_templates/llama.jinja": LLAMA3,
    }
    path = folder(ZEPHYR, files)
    template = ChatTemplate.from_pretrained(path)
    assert set(template.templates) == {"default", "tool_use", "llama"}
    for kwargs in ({}, {"chat_template": "llama"}, {"tools": [WEATHER_TOOL]}, {"chat_template": MISTRAL}):
        ours, want = _both(path, CHATS["single"], add_generation_prompt=True, **kwargs)
        assert ours == want, kwargs
    path = folder(ZEPHYR, {"chat_template.jinja": CHATML})
    assert ChatTemplate.from_pretrained(path).templates == CHATML


def test_named_templates_in_tokenizer_config(folder):
    """A list of named templates picks 'default' or the one asked for, as transformers; without a default it names the choices."""
    path = folder([{"name": "default", "template": CHATML}, {"name": "rag", "template": LLAMA3}])
    for kwargs in ({}, {"chat_template": "rag"}):
        ours, want = _both(path, CHATS["system"], **kwargs)
        assert ours == want
    path = folder([{"name": "rag", "template": LLAMA3}, {"name": "tool_use", "template": TOOLS}])
    with pytest.raises(ValueError, match=r"several chat templates and none named 'default'.*\['rag', 'tool_use'\]"):
        ChatTemplate.from_pretrained(path).render(CHATS["single"])


def test_special_tokens_are_variables(folder):
    """bos/eos/... and other "*_token" strings of tokenizer_config.json, as transformers passes them."""
    pad = {"__type": "AddedToken", "content": "<|im_end|>", "special": True}
    path = folder(
        "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ image_token }}|{{ m }}",
        pad_token=pad,
        image_token="<|user|>",
    )
    assert special_tokens_of(path) == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<|im_end|>",
        "image_token": "<|user|>",
    }
    ours, want = _both(path, CHATS["single"], m="extra")
    assert ours == want == "<s>|</s>|<|im_end|>|<|user|>|extra"


def test_rendered_chat_tokenized_without_added_special_tokens(folder):
    """The pipeline tokenizes the rendered chat with add_special_tokens=False: the template's tokens only."""
    path = folder(LLAMA3)
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    ours = OurTokenizer.from_pretrained(path)
    text = chat_prompt(ChatTemplate.from_pretrained(path), CHATS["multi-turn"])
    want = hf.apply_chat_template(CHATS["multi-turn"], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert encode_chat_prompt(ours, text).input_ids == want
    assert ours.convert_ids_to_tokens(want[:2]) == ["<s>", "<|start_header_id|>"]


@pytest.fixture
def hf_chat_pipeline(folder):
    path = folder(CHATML)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
    config = transformers.GPT2Config(vocab_size=len(hf_tok), n_embd=32, n_head=4, n_layer=2, n_positions=128)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    return path, transformers.pipeline("text-generation", model=model, tokenizer=hf_tok, device="cpu")


def test_pipeline_chat_prompt_and_reply_structure(hf_chat_pipeline):
    """The pipeline's prompt ids for a chat, and its `generated_text`: the chat plus an assistant message, or the
    last assistant message continued."""
    path, pipe = hf_chat_pipeline
    ours = OurTokenizer.from_pretrained(path)
    template = ChatTemplate.from_pretrained(path)
    for messages in (CHATS["system"], CHATS["ends-with-assistant"]):
        want_ids = pipe.preprocess(transformers.pipelines.base.Chat(messages))["input_ids"][0].tolist()
        assert encode_chat_prompt(ours, chat_prompt(template, messages)).input_ids == want_ids
        full = pipe(messages, max_new_tokens=3, do_sample=False)
        new = pipe(messages, max_new_tokens=3, do_sample=False, return_full_text=False)
        assert full == [{"generated_text": chat_reply(messages, new[0]["generated_text"])}]
    assert continues_final_message(CHATS["ends-with-assistant"]) and not continues_final_message(CHATS["system"])
    assert not continues_final_message(CHATS["ends-with-assistant"], False)


def test_chat_detection():
    """transformers' rule: a list whose first item is a {"role", "content"} dict is one chat; a list of such lists
    is a batch of chats; anything else (strings) is prompts."""
    assert is_chat(CHATS["single"]) and is_chat(tuple(CHATS["system"]))
    assert not is_chat(["hello", "world"]) and not is_chat([]) and not is_chat("hello")
    assert not is_chat([{"role": "user"}])  # no content: not a message
    assert is_chat_batch([CHATS["single"], CHATS["system"]])
    assert not is_chat_batch(CHATS["single"]) and not is_chat_batch([CHATS["single"], ["text"]])


@pytest.mark.parametrize(
    "messages,error,message",
    [
        ("hello", TypeError, r"a chat must be a list of \{'role', 'content'\} dicts, got str"),
        ([], ValueError, r"a chat needs at least one message"),
        (["hello"], TypeError, r"chat message #0 must be a dict with 'role' and 'content', got 'hello'"),
        ([USER, {"role": "assistant"}], ValueError, r"chat message #1 lacks 'content'"),
        ([{"content": "hi"}], ValueError, r"chat message #0 lacks 'role'"),
        ([{"role": 3, "content": "hi"}], TypeError, r"chat message #0: role must be a string such as 'user', got 3"),
    ],
)
def test_message_errors(folder, messages, error, message):
    """Malformed messages are refused, naming the message and the field, by the template and by check_messages alike."""
    with pytest.raises(error, match=message):
        ChatTemplate.from_pretrained(folder(CHATML)).render(messages)
    with pytest.raises(error, match=message):
        check_messages(messages)


def test_template_errors(folder):
    """A tokenizer without a chat template, or an unknown template name, fails saying how to pass one."""
    with pytest.raises(
        ValueError,
        match=r"this tokenizer has no chat template .*pass a Jinja template as "
        r"chat_template=",
    ):
        ChatTemplate.from_pretrained(folder()).render(CHATS["single"])
    rendered = ChatTemplate.from_pretrained(folder()).render(CHATS["single"], chat_template=CHATML)
    assert rendered.startswith("<|im_start|>system")
    template = ChatTemplate.from_pretrained(folder(CHATML))
    with pytest.raises(ValueError, match=r"the chat template is not valid Jinja: .*\(line 1\)"):
        template.render(CHATS["single"], chat_template="{% for m in messages %}")
    with pytest.raises(ValueError, match=r"the chat template failed to render: UndefinedError"):
        template.render(CHATS["single"], chat_template="{{ messages[0].nothing.deeper }}")
    with pytest.raises(ValueError, match=r"failed to render: SecurityError: .*underscore"):
        template.render(CHATS["single"], chat_template="{% set ns = namespace(_x=1) %}")
    with pytest.raises(ValueError, match=r"failed to render: SecurityError"):
        template.render(CHATS["single"], chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match=r"continue_final_message and add_generation_prompt cannot both be set"):
        template.render(CHATS["single"], add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(TypeError, match=r"tools must be a list of JSON schema dicts"):
        template.render(CHATS["single"], tools=[print])
    with pytest.raises(TypeError, match=r"chat templates must be a string or a dict"):
        ChatTemplate(42)

"""CLIP and SigLIP: model parity with transformers, SigLIP's SentencePiece tokenizer, zero-shot image classification
and the shared-space embeddings, on tiny random checkpoints made here (transformers builds and saves them)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers, processors, trainers

from pipelines import pipeline
from pipelines.models import clip, siglip
from pipelines.sentencepiece_tokenizer import SentencePieceTokenizer
from pipelines.tokenization import Tokenizer
from tests.checkpoints import SENTENCES, load_ours
from tests.image_checkpoints import random_image

TOWER = dict(hidden_size=32, num_attention_heads=4, intermediate_size=37, num_hidden_layers=2)
VISION = dict(TOWER, image_size=32, patch_size=8)
LABELS = ["a cat", "a dog", "two birds on a tree", "a red car"]
TEXTS = ["This is a photo of a cat.", "A DOG!", "two birds on a tree, singing", "car"]
IMAGES = [random_image(i, h, w) for i, (h, w) in enumerate([(40, 50), (32, 32), (64, 48), (33, 70), (50, 40)])]
# Strings for the SentencePiece tokenizer: case, punctuation, spacing, special tokens in the text, unicode, "▁".
TOKENIZER_STRINGS = [
    *SENTENCES,
    *TEXTS,
    *(f"This is a photo of {label}." for label in LABELS),
    "",
    " ",
    "!!!",
    "x</s>y",
    "x </s> y",
    "</s>hi",
    "end with eos</s>",
    "hello</s></s>world",
    "<unk>",
    "a<unk>b",
    "  spaced   out  ",
    "tab\tnew\nline",
    "▁weird",
    "▁▁",
    "café naïve Zürich",
    "UPPER lower MiXeD",
    "it's a dog's life",
    "3.14 + 2 = 5.14",
    "emoji 😀 here",
    "中文字符",
    "(parens) [brackets] {braces}",
    "a--b__c",
    "a photo of a {}.",
    "ALL CAPS SENTENCE WITH PUNCTUATION?!",
    "many many many many many many many many many many many many words in a very long sentence indeed",
    "semi;colons:and/slashes\\back",
    "quotes \"double\" and 'single'",
    "   leading spaces",
    "trailing spaces   ",
    "MiXeD</s>CaSe<unk>Tokens",
    "hyphen-ated well-known",
]


def _perturb(model):
    """transformers' init leaves biases at 0 and norms at 1: move every weight so that each one matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    return model.eval()


def _clip_tokenizer_json() -> HFTokenizer:
    """A CLIP-like tokenizer: lower-cased, BPE with an end-of-word suffix, <|startoftext|> $A <|endoftext|>."""
    tok = HFTokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=99,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        limit_alphabet=40,
        show_progress=False,
    )
    tok.train_from_iterator([s.lower() for s in SENTENCES + TEXTS + LABELS] * 2, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)]
    )
    return tok


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return make_clip_checkpoint(tmp_path_factory.mktemp("clip"))


def make_clip_checkpoint(path: Path) -> Path:
    """A tiny random CLIPModel folder with its tokenizer files and CLIPImageProcessor config (also served by
    tests/deploy/test_app.py)."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    tok = _clip_tokenizer_json()
    tok.save(str(path / "tokenizer.json"))
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    config = {
        **specials,
        "unk_token": "<|endoftext|>",
        "model_max_length": 77,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "special_tokens_map.json").write_text(json.dumps(specials))
    text = dict(TOWER, vocab_size=tok.get_vocab_size(), max_position_embeddings=77, bos_token_id=0, eos_token_id=1)
    towers = dict(
        text_config={**text, "pad_token_id": 1, "projection_dim": 24}, vision_config={**VISION, "projection_dim": 24}
    )
    config = transformers.CLIPConfig(**towers, projection_dim=24)  # each tower repeats it, as released configs do
    _perturb(transformers.CLIPModel(config)).save_pretrained(path)
    size = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    transformers.CLIPImageProcessor(**size).save_pretrained(path)
    return path


def _train_sentencepiece(path) -> None:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([s.lower() for s in SENTENCES + TEXTS + LABELS] * 3),
        model_writer=model,
        vocab_size=120,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    (path / "spiece.model").write_bytes(model.getvalue())


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    import transformers

    path = tmp_path_factory.mktemp("siglip")
    _train_sentencepiece(path)
    tokenizer = transformers.SiglipTokenizer(str(path / "spiece.model"))
    (path / "spiece.model").unlink()
    tokenizer.save_pretrained(path)  # spiece.model + tokenizer_config.json, as SigLIP checkpoints ship
    text = dict(TOWER, vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    config = transformers.SiglipConfig(text_config=text, vision_config=VISION)
    _perturb(transformers.SiglipModel(config)).save_pretrained(path)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _reference(folder, cls_name: str):
    import transformers

    return getattr(transformers, cls_name).from_pretrained(folder, dtype=torch.float32).eval()


def _hf_text_inputs(folder, texts, **kwargs):
    import transformers

    return dict(transformers.AutoTokenizer.from_pretrained(folder)(texts, return_tensors="pt", **kwargs))


# -- models -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_logits_and_features_match_transformers(family, clip_folder, siglip_folder):
    """Both towers, the projections and the scale (and SigLIP's bias) agree with transformers within 1e-4."""
    folder, ours_cls, ref_cls = {
        "clip": (clip_folder, clip.CLIPModel, "CLIPModel"),
        "siglip": (siglip_folder, siglip.SiglipModel, "SiglipModel"),
    }[family]
    ours, ref = load_ours(folder, ours_cls), _reference(folder, ref_cls)
    padding = {"padding": "max_length", "max_length": 64} if family == "siglip" else {"padding": True}
    text = _hf_text_inputs(folder, TEXTS, **padding)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = ref(**text, pixel_values=pixels)
        got = ours(text["input_ids"], pixels, text["attention_mask"])
        torch.testing.assert_close(got, want.logits_per_image, atol=1e-4, rtol=1e-4)
        want_text = ref.get_text_features(**text).pooler_output
        torch.testing.assert_close(ours.get_text_features(text["input_ids"], text["attention_mask"]), want_text)
        torch.testing.assert_close(ours.get_image_features(pixels), ref.get_image_features(pixels).pooler_output)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_interpolated_position_embeddings(family, clip_folder, siglip_folder):
    """Another input size (48 x 40 for a 32 x 32 model) interpolates the position grid as transformers does;
    without interpolate_pos_encoding it is a ValueError naming the sizes."""
    folder, ours_cls, ref_cls = {
        "clip": (clip_folder, clip.CLIPModel, "CLIPModel"),
        "siglip": (siglip_folder, siglip.SiglipModel, "SiglipModel"),
    }[family]
    ours, ref = load_ours(folder, ours_cls), _reference(folder, ref_cls)
    pixels = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        want = ref.get_image_features(pixels, interpolate_pos_encoding=True).pooler_output
        torch.testing.assert_close(ours.get_image_features(pixels, interpolate_pos_encoding=True), want)
        with pytest.raises(ValueError, match="48x40.*interpolate_pos_encoding=True"):
            ours.get_image_features(pixels)


def test_clip_pools_at_the_first_eos_or_at_the_highest_id_for_legacy_configs(clip_folder, tmp_path):
    """eos_token_id pools at the first end-of-text token (the padding equals it here); a pre-#24773 config
    (eos_token_id=2) pools at the argmax of the ids, as transformers keeps doing for those."""
    import transformers

    ids = torch.tensor([[0, 5, 9, 1, 1, 1], [0, 40, 7, 3, 2, 1]])  # row 2: the highest id (40) is not the eos
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    pooled = []
    for eos in (1, 2):
        config = json.loads((clip_folder / "config.json").read_text())
        config["text_config"]["eos_token_id"] = eos
        folder = tmp_path / f"eos{eos}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "model.safetensors").symlink_to(clip_folder / "model.safetensors")
        ours = load_ours(folder, clip.CLIPModel)
        ref = transformers.CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            want = ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
            pooled.append(ours.get_text_features(ids, mask))
            torch.testing.assert_close(pooled[-1], want)
    assert not torch.allclose(pooled[0], pooled[1])  # the two rules pool at other positions here


@pytest.mark.parametrize(
    "ours_cls, ref_cls, modality",
    [
        (clip.CLIPTextModel, "CLIPTextModel", "text"),
        (clip.CLIPTextModelWithProjection, "CLIPTextModelWithProjection", "text"),
        (clip.CLIPVisionModel, "CLIPVisionModel", "image"),
        (clip.CLIPVisionModelWithProjection, "CLIPVisionModelWithProjection", "image"),
        (siglip.SiglipTextModel, "SiglipTextModel", "text"),
        (siglip.SiglipVisionModel, "SiglipVisionModel", "image"),
    ],
)
def test_towers_load_from_the_full_checkpoint(ours_cls, ref_cls, modality, clip_folder, siglip_folder):
    """A tower class loads from the two-tower checkpoint (the other tower's keys dropped) and equals transformers'
    pooled output (text_embeds / image_embeds with a projection)."""
    folder = clip_folder if ref_cls.startswith("CLIP") else siglip_folder
    ours, ref = load_ours(folder, ours_cls), _reference(folder, ref_cls)
    with torch.no_grad():
        if modality == "text":
            inputs = _hf_text_inputs(folder, TEXTS, padding=True)
            got, out = ours(inputs["input_ids"], inputs["attention_mask"]), ref(**inputs)
        else:
            pixels = torch.randn(2, 3, 32, 32)
            got, out = ours(pixels), ref(pixel_values=pixels)
    want = getattr(out, f"{modality}_embeds", None)
    torch.testing.assert_close(got, out.pooler_output if want is None else want)


def test_unsupported_configs_raise_naming_the_key():
    """from_hf refuses what the code does not implement, naming the key and what is supported."""
    with pytest.raises(ValueError, match="vision_use_head"):
        siglip.SiglipConfig.from_hf({"model_type": "siglip", "vision_config": {"vision_use_head": False}})
    with pytest.raises(ValueError, match="image_size"):
        clip.CLIPConfig.from_hf({"model_type": "clip", "vision_config": {"image_size": [224, 160]}})
    with pytest.raises(ValueError, match="unsupported activation 'swiglu'"):
        clip.CLIPConfig.from_hf({"model_type": "clip", "text_config": {"hidden_act": "swiglu"}})
    with pytest.raises(ValueError, match="not a CLIP config"):
        clip.CLIPConfig.from_hf({"model_type": "siglip"})


# -- the SentencePiece tokenizer ----------------------------------------------------------------------------------
def test_sentencepiece_tokenizer_ids_equal_siglip_tokenizer(siglip_folder):
    """Tokenizer.from_pretrained on a spiece.model-only folder gives transformers' SiglipTokenizer ids for every
    string (lower-casing, punctuation removal, special tokens in the text, spacing), truncated or not, and pairs."""
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(siglip_folder)
    assert type(ref).__name__ == "SiglipTokenizer"
    ours = Tokenizer.from_pretrained(siglip_folder)
    assert isinstance(ours, SentencePieceTokenizer)
    assert (ours.pad_token_id, ours.model_max_length, ours.vocab_size) == (ref.pad_token_id, 64, len(ref))
    for text in TOKENIZER_STRINGS:
        assert ours.encode(text).input_ids == ref(text).input_ids, text
        assert ours.encode(text, max_length=5).input_ids == ref(text, truncation=True, max_length=5).input_ids, text
    pair = ("a photo of a cat", "two dogs on a sofa and more")
    for strategy in ("longest_first", "only_first", "only_second"):
        want = ref(*pair, truncation=strategy, max_length=8).input_ids
        assert ours.encode(*pair, max_length=8, truncation=strategy).input_ids == want, strategy
    ids = ref("Hello world, a photo!").input_ids
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_sentencepiece_tokenizer_pickles_and_refuses_other_classes(siglip_folder, tmp_path):
    """It travels to Ray workers (pickle) and encodes the same there; a SentencePiece-only folder of another
    tokenizer class is refused, naming it, rather than tokenized by SigLIP's rules."""
    import pickle

    ours = Tokenizer.from_pretrained(siglip_folder)
    assert pickle.loads(pickle.dumps(ours)).encode(TEXTS[0]).input_ids == ours.encode(TEXTS[0]).input_ids
    (tmp_path / "spiece.model").write_bytes((siglip_folder / "spiece.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    with pytest.raises(ValueError, match="tokenizer_class='T5Tokenizer'"):
        Tokenizer.from_pretrained(tmp_path)


# -- zero-shot image classification ----------------------------------------------------------------------------------
def _assert_same_answers(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert [x["label"] for x in g] == [x["label"] for x in w]
        torch.testing.assert_close([x["score"] for x in g], [x["score"] for x in w], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_zero_shot_equals_transformers_pipeline(family, clip_folder, siglip_folder):
    """Scores and order equal transformers' pipeline (CLIP: softmax across labels; SigLIP: sigmoid, texts padded
    to 64), for the default template and another one, one image and a list."""
    import transformers

    folder = clip_folder if family == "clip" else siglip_folder
    theirs = transformers.pipeline("zero-shot-image-classification", model=str(folder))
    ours = pipeline("zero-shot-image-classification", model=folder)
    _assert_same_answers([ours(IMAGES[0], candidate_labels=LABELS)], [theirs(IMAGES[0], candidate_labels=LABELS)])
    template = "a picture showing {}"
    want = theirs(IMAGES, candidate_labels=LABELS[:3], hypothesis_template=template)
    _assert_same_answers(ours(IMAGES, candidate_labels=LABELS[:3], hypothesis_template=template, batch_size=2), want)
    if family == "clip":
        assert sum(x["score"] for x in want[0]) == pytest.approx(1.0)


def test_text_tower_runs_once_per_label_set(clip_folder):
    """Five images in micro-batches of two: the text tower runs once (all labels in one pass), the vision tower
    once per micro-batch; the answers equal one image at a time."""
    pipe = pipeline("zero-shot-image-classification", model=clip_folder, candidate_labels=LABELS)
    calls = {"text": [], "vision": []}
    hooks = [
        pipe.model.text_model.register_forward_hook(lambda m, args, out: calls["text"].append(out.shape[0])),
        pipe.model.vision_model.register_forward_hook(lambda m, args, out: calls["vision"].append(out.shape[0])),
    ]
    try:
        batched = pipe(IMAGES, batch_size=2)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"text": [len(LABELS)], "vision": [2, 2, 1]}
    _assert_same_answers(batched, [pipe(image) for image in IMAGES])


def test_zero_shot_bad_parameters_are_clear_errors(clip_folder):
    """transformers fails deep inside (an empty label list reaches the tokenizer, a template without {} scores
    the same text for every label); ours names the problem before any image is read."""
    pipe = pipeline("zero-shot-image-classification", model=clip_folder)
    with pytest.raises(ValueError, match="no candidate labels"):
        pipe(IMAGES[0], candidate_labels=[])
    with pytest.raises(ValueError, match="no candidate labels"):
        pipe(IMAGES[0])
    with pytest.raises(ValueError, match="has no '\\{\\}' where the label should go"):
        pipe(IMAGES[0], candidate_labels=LABELS, hypothesis_template="a photo")
    with pytest.raises(TypeError, match="candidate_labels must be a list of strings"):
        pipe(IMAGES[0], candidate_labels=[1, 2])
    with pytest.raises(TypeError, match="unknown parameters \\['top_k'\\]"):
        pipe(IMAGES[0], candidate_labels=LABELS, top_k=2)
    with pytest.raises(ValueError, match="bytes input of 12 bytes: not an image"):
        pipe(b"not an image", candidate_labels=LABELS)


def test_zero_shot_task_is_inferred_from_the_architecture(siglip_folder):
    """pipeline(model=...) with no task serves a CLIPModel / SiglipModel folder as zero-shot image classification;
    positional labels work as in transformers."""
    pipe = pipeline(model=siglip_folder)
    assert pipe.task == "zero-shot-image-classification"
    assert [x["label"] for x in pipe(IMAGES[1], LABELS)] == [
        x["label"] for x in pipe(IMAGES[1], candidate_labels=LABELS)
    ]


# -- embeddings in the shared space ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_shared_space_embeddings_equal_get_features(family, clip_folder, siglip_folder):
    """image-embeddings and sentence-embeddings on a dual encoder are transformers' get_image_features /
    get_text_features of its processors' inputs (SigLIP's texts padded to 64), normalized on request."""
    import transformers

    folder = clip_folder if family == "clip" else siglip_folder
    ref = _reference(folder, "CLIPModel" if family == "clip" else "SiglipModel")
    padding = {"padding": "max_length", "max_length": 64} if family == "siglip" else {"padding": True}
    pixels = transformers.AutoImageProcessor.from_pretrained(folder)(IMAGES, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want_images = ref.get_image_features(pixel_values=pixels).pooler_output
        want_texts = ref.get_text_features(**_hf_text_inputs(folder, TEXTS, **padding)).pooler_output
    images = pipeline("image-embeddings", model=folder)(IMAGES, batch_size=2, return_tensors=True)
    torch.testing.assert_close(torch.stack(images), want_images, atol=1e-4, rtol=1e-4)
    texts = pipeline("sentence-embeddings", model=folder, normalize=True)(TEXTS, batch_size=3)
    torch.testing.assert_close(torch.tensor(texts), torch.nn.functional.normalize(want_texts, dim=-1))


def test_zero_shot_stages_apart_equal_one_call(clip_folder):
    """The Ray stages' split: a pipeline built without weights preprocesses (decode, resize: uint8 pixels), the
    weighted one runs run_model (the labels' texts encoded there once), postprocess needs no weights; the answers
    equal one in-process call."""
    cpu = pipeline("zero-shot-image-classification", model=clip_folder, load_weights=False, candidate_labels=LABELS)
    gpu = pipeline("zero-shot-image-classification", model=clip_folder, candidate_labels=LABELS)
    features = [part for i, image in enumerate(IMAGES) for part in cpu.preprocess_item(image, i)]
    assert all(f["pixels"].dtype == torch.uint8 and f["pixels"].shape == (3, 32, 32) for f in features)
    outputs = gpu.run_model(features, batch_size=2)
    answers = [cpu.postprocess_item([{**f, **o}]) for f, o in zip(features, outputs)]
    _assert_same_answers(answers, gpu(IMAGES))

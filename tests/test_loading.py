"""Loading: resolution through the cache, strict key checks, dtype, int8, device_map with offload, pickles."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines import pipeline
from pipelines.hub import import_folder
from pipelines.loading import CheckpointError, WeightsMapper
from pipelines.models.bert import BertForMaskedLM
from pipelines.runtime import RuntimeConfig, parse_device, parse_dtype
from tests.checkpoints import SENTENCES, assert_parity, encode, load_ours, load_reference


def _reference_logits(path, texts):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = load_reference(path, "sequence-classification")
    with torch.no_grad():
        return model(**tok(texts, return_tensors="pt", padding=True)).logits


def _logits(pipe, texts):
    return torch.stack([o["logits"] for o in pipe.run_model([pipe.preprocess(t) for t in texts])]).float()


@pytest.fixture(scope="module")
def classifier(checkpoint):
    return checkpoint("bert", "sequence-classification")


def test_sharded_checkpoint_loads_equal(checkpoint):
    """A sharded safetensors checkpoint (index + shards) gives the reference logits within 1e-4."""
    path = checkpoint("roberta", "sequence-classification", sharded=True)
    assert (path / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(
        _logits(pipeline(model=path), SENTENCES), _reference_logits(path, SENTENCES), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("dtype,atol", [("bfloat16", 0.05), ("float16", 0.01)])
def test_half_precision_within_tolerance(classifier, dtype, atol):
    """bf16 logits within 0.05 and fp16 within 0.01 of float32 (tiny model, logits ~0.1 in size)."""
    pipe = pipeline(model=classifier, dtype=dtype)
    assert next(pipe.model.parameters()).dtype == getattr(torch, dtype)
    torch.testing.assert_close(_logits(pipe, SENTENCES), _reference_logits(classifier, SENTENCES), atol=atol, rtol=0)


def test_int8_weight_only_within_tolerance(classifier):
    """quantization='int8' replaces every linear layer; logits stay within 0.02 of float32."""
    from pipelines.layers import Int8Linear

    pipe = pipeline(model=classifier, quantization="int8")
    linears = [m for m in pipe.model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 2 * 6 + 2  # 6 per layer (q, k, v, out, up, down), pooler, classifier
    assert all(m.weight.dtype == torch.int8 for m in linears)
    torch.testing.assert_close(_logits(pipe, SENTENCES), _reference_logits(classifier, SENTENCES), atol=0.02, rtol=0)


def test_device_map_auto_and_disk_offload_give_equal_outputs(classifier, tmp_path):
    """device_map='auto' (all CPU here) and a map that offloads layers to disk match plain loading."""
    plain = _logits(pipeline(model=classifier), SENTENCES)
    auto = pipeline(model=classifier, device_map="auto")
    torch.testing.assert_close(_logits(auto, SENTENCES), plain, atol=1e-5, rtol=0)
    device_map = {
        "bert.embeddings": "cpu",
        "bert.encoder.layer.0": "disk",
        "bert.encoder.layer.1": "disk",
        "bert.pooler": "cpu",
        "classifier": "cpu",
    }
    offloaded = pipeline(model=classifier, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert any((tmp_path / "offload").iterdir())
    torch.testing.assert_close(_logits(offloaded, SENTENCES), plain, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="offload_folder"):
        pipeline(model=classifier, device_map=device_map)


def test_missing_key_is_named(classifier, tmp_path):
    """A checkpoint lacking a weight raises CheckpointError naming the key and listing what it has."""
    folder = tmp_path / "broken"
    shutil.copytree(classifier, folder)
    weights = load_file(folder / "model.safetensors")
    del weights["classifier.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no weight for 'classifier.weight'.*the checkpoint has: bert\."):
        pipeline(model=folder)


def test_unexpected_and_misshaped_keys_are_named(classifier, tmp_path):
    """A key with no place in the class, and one of the wrong shape, raise CheckpointError naming key and shapes."""
    folder = tmp_path / "broken"
    shutil.copytree(classifier, folder)
    weights = load_file(folder / "model.safetensors")
    weights["bert.encoder.layer.7.output.dense.weight"] = torch.zeros(2, 2)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="'bert.encoder.layer.7.output.dense.weight'.*has no place"):
        pipeline(model=folder)
    del weights["bert.encoder.layer.7.output.dense.weight"]
    weights["classifier.weight"] = torch.zeros(5, 32)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'classifier.weight' has shape \(5, 32\).*needs \(3, 32\)"):
        pipeline(model=folder)


def test_weights_mapper_applies_its_tables_in_order():
    """Renames first, then the bare checkpoint's prefix, then other heads' keys dropped, then the prefix removed for
    the base model; parts are whole dotted components, so `classifier_extra` is not under `classifier`."""
    family = WeightsMapper(
        prefix="enc.",
        base_parts=("embed", "layers"),
        keys={"head.copy": None},
        suffixes={".gamma": ".weight", ".buffer": None},
        head_parts=("enc.pooler", "head", "classifier"),
    )
    head = family.for_head("head")
    assert head.rename("embed.norm.gamma") == "enc.embed.norm.weight"
    assert head.rename("enc.layers.0.buffer") is None
    assert head.rename("head.copy") is None and head.rename("head.dense.weight") == "head.dense.weight"
    assert head.rename("classifier.weight") is None and head.rename("enc.pooler.dense.bias") is None
    assert head.rename("classifier_extra.weight") == "classifier_extra.weight"  # left for the loader to report
    base = family.for_base_model()
    assert base.rename("enc.layers.1.w") == "layers.1.w" and base.rename("layers.1.w") == "layers.1.w"
    assert base.rename("head.dense.weight") is None
    assert WeightsMapper().rename("any.key") == "any.key"  # a class without a mapper loads its keys as stored


def test_weights_mapper_rejects_parts_outside_its_family():
    """A class that claims a head part its family does not list, or a prefix without its dot, fails at import."""
    with pytest.raises(ValueError, match=r"owned parts \['lm_head'\] are not among .*'classifier'"):
        WeightsMapper(head_parts=("classifier",)).for_head("lm_head")
    with pytest.raises(ValueError, match="prefix must end with '.'"):
        WeightsMapper(prefix="bert", base_parts=("embeddings",))


def test_untied_head_comes_from_the_checkpoint(checkpoint, tmp_path):
    """tie_word_embeddings=false: a masked-LM decoder is the checkpoint's own (outputs equal transformers'), and a
    checkpoint that lacks it is an error naming the key, not a silent copy of the embeddings."""
    path = checkpoint("bert", "masked-lm", tie_word_embeddings=False)
    model = load_ours(path, BertForMaskedLM)
    assert not torch.equal(model.cls["predictions"].decoder.weight, model.bert.embeddings.word_embeddings.weight)
    assert_parity(model, load_reference(path, "masked-lm"), "masked-lm", encode(path, SENTENCES[:3]))
    folder = tmp_path / "untied"
    shutil.copytree(path, folder)
    weights = load_file(folder / "model.safetensors")
    del weights["cls.predictions.decoder.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="no weight for 'cls.predictions.decoder.weight'"):
        load_ours(folder, BertForMaskedLM)


def test_pickled_weights_refused_unless_allowed(classifier, tmp_path):
    """A pytorch_model.bin folder is refused by default, and loads with allow_pickle=True (weights_only)."""
    folder = tmp_path / "pickled"
    shutil.copytree(classifier, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="pickled weights.*allow_pickle=True"):
        pipeline(model=folder)
    pipe = pipeline(model=folder, allow_pickle=True)
    torch.testing.assert_close(_logits(pipe, SENTENCES), _reference_logits(classifier, SENTENCES), atol=1e-4, rtol=1e-4)


def test_hub_id_through_the_offline_cache_with_revision(classifier, tmp_path):
    """An imported folder resolves by Hub id, by branch name and by commit hash; unknown ids fail clearly."""
    snapshot = import_folder(classifier, "tiny-org/tiny-classifier", revision="v1")
    pipe = pipeline(model="tiny-org/tiny-classifier", revision="v1")
    assert pipe.model_path == snapshot
    assert pipeline(model="tiny-org/tiny-classifier", revision=snapshot.name).model_path == snapshot
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*python -m pipelines.hub import"):
        pipeline(model="tiny-org/does-not-exist")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipeline(model=str(tmp_path / "nowhere"))


def test_unsupported_architecture_lists_supported(classifier, tmp_path):
    """An unknown architecture or model_type fails naming it and listing what is supported, for both lookups."""
    folder = tmp_path / "gpt"
    shutil.copytree(classifier, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="gpt_neo", architectures=["GPTNeoForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'GPTNeoForCausalLM'; supported: .*BertForMaskedLM"):
        pipeline(model=folder)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neo'.*supported: \\['bert'"):
        pipeline("text-classification", model=folder)


@pytest.mark.parametrize("bad", ["float8", "int4", 3])
def test_invalid_dtype(bad):
    """A dtype we do not implement (float8, int4) or of the wrong type is a ValueError listing the allowed ones."""
    with pytest.raises(ValueError, match="unsupported dtype.*allowed"):
        parse_dtype(bad)


def test_dtype_forms():
    """Short names and torch dtypes are accepted; "auto" reads config.json's torch_dtype; None is float32."""
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    assert parse_dtype("auto", {"torch_dtype": "bfloat16"}) is torch.bfloat16
    assert parse_dtype(None) is torch.float32


@pytest.mark.parametrize("bad,error", [("gpu", ValueError), ("tpu:0", ValueError), (1.5, TypeError), ([0], TypeError)])
def test_invalid_device(bad, error):
    """A device string torch does not know, an unsupported device type or a wrong type is refused, naming device."""
    with pytest.raises(error, match="device"):
        parse_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda_is_a_clear_error(classifier):
    """Asking for CUDA (by name or index) on a machine without it is a ValueError saying so, not a torch trace."""
    with pytest.raises(ValueError, match="no CUDA device"):
        pipeline(model=classifier, device="cuda")
    with pytest.raises(ValueError, match="no CUDA device"):
        pipeline(model=classifier, device=0)


def test_runtime_option_errors():
    """Conflicting or unknown runtime options (device with device_map, unknown map or quantization) are refused."""
    with pytest.raises(ValueError, match="either device or device_map"):
        RuntimeConfig.create(device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="unknown device_map 'everywhere'"):
        RuntimeConfig.create(device_map="everywhere")
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        RuntimeConfig.create(quantization="int3")

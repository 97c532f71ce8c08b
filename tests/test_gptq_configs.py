"""Quantize configs and weight files as GPTQModel, AutoGPTQ and transformers write them: the format keys
(`format`, `checkpoint_format`), `pack_dtype`, `lm_head`, and AutoGPTQ's shard index named after
`model_file_base_name`. Each bad folder gets one exact line (exit code 1); two of them through the real command."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from talis_cli.engine import Engine, LoadSettings
from talis_cli.errors import TalisError
from tests.test_cli import one_line_error, run_talis
from tests.tiny_models import hf_model, save_gptq, write_shards

TOKENS = torch.randint(3, 4096, (1, 16), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def model():
    return hf_model(seed=31, num_key_value_heads=2)


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory, model):
    """Asymmetric 4-bit g32 weights in the v1 format (stored zero = zero - 1), named by `checkpoint_format`."""
    folder = tmp_path_factory.mktemp("v1")
    save_gptq(model, folder, bits=4, group_size=32, sym=False)
    return folder


def logits(folder):
    engine = Engine.load(LoadSettings(model_dir=folder, device_map="cpu", backend="torch", max_seq_len=32))
    engine.model.clear_cache()
    with torch.no_grad():
        return engine.model(TOKENS), engine


def error_of(folder) -> str:
    with pytest.raises(TalisError) as info:
        logits(folder)
    assert info.value.exit_code == 1
    return str(info.value)


def edit_quantize_config(folder, **changes) -> None:
    """Set (value) or remove (None) keys of the folder's quantize_config.json."""
    path = folder / "quantize_config.json"
    qc = json.loads(path.read_text())
    qc.update(changes)
    path.write_text(json.dumps({k: v for k, v in qc.items() if v is not None}))


def copy_of(folder, tmp_path, name="copy"):
    return shutil.copytree(folder, tmp_path / name)


# ---------------------------------------------------------------- format / checkpoint_format
@pytest.mark.parametrize("keys", [{"format": "gptq_v2"}, {"checkpoint_format": "gptq_v2"},
                                  {"format": "gptq_v2", "checkpoint_format": "gptq_v2"}], ids=str)
def test_gptq_v2_named_by_either_key_equals_the_v1_weights(tmp_path, model, v1_dir, keys):
    v2_dir = tmp_path / "v2"
    save_gptq(model, v2_dir, bits=4, group_size=32, sym=False, format_keys=keys)
    v1_zeros = load_file(str(v1_dir / "model.safetensors"))["model.layers.0.mlp.up_proj.qzeros"]
    assert not torch.equal(load_file(str(v2_dir / "model.safetensors"))["model.layers.0.mlp.up_proj.qzeros"], v1_zeros)
    expected, _ = logits(v1_dir)
    got, engine = logits(v2_dir)
    assert engine.quant.checkpoint_format == "gptq_v2"
    assert torch.equal(got, expected)  # the same integers dequantized: bit-exact
    # read as v1 (what talis did when it knew only `checkpoint_format`), every zero is off by one
    edit_quantize_config(v2_dir, format=None, checkpoint_format=None)
    misread, engine = logits(v2_dir)
    assert engine.quant.checkpoint_format == "gptq"
    assert (misread - expected).abs().max() > 0.1 * expected.abs().max()


def test_format_keys_that_disagree_or_name_another_format(tmp_path, v1_dir):
    folder = copy_of(v1_dir, tmp_path)
    qc = folder / "quantize_config.json"
    edit_quantize_config(folder, format="gptq_v2", checkpoint_format="gptq")
    assert error_of(folder) == (f"{qc}: format 'gptq_v2' and checkpoint_format 'gptq' disagree; "
                                f"keep the one that describes the weights")
    edit_quantize_config(folder, format="marlin", checkpoint_format=None)
    assert error_of(folder) == f"{qc}: format 'marlin' is not supported; talis reads gptq, gptq_v2"
    edit_quantize_config(folder, format="GPTQ")  # GPTQModel reads the format in any case
    assert logits(folder)[1].quant.checkpoint_format == "gptq"


def test_disagreeing_format_keys_through_the_command(tmp_path, v1_dir):
    folder = copy_of(v1_dir, tmp_path)
    edit_quantize_config(folder, format="gptq", checkpoint_format="gptq_v2")
    result = run_talis("generate", "-m", folder, "-p", "hello", "-n", "2")
    assert result.returncode == 1 and result.stdout == b""
    assert one_line_error(result) == (f"error: {folder / 'quantize_config.json'}: format 'gptq' and checkpoint_format "
                                      f"'gptq_v2' disagree; keep the one that describes the weights\n")


# ---------------------------------------------------------------- pack_dtype
def test_pack_dtype_int32_or_absent_loads_and_others_are_refused(tmp_path, v1_dir):
    folder = copy_of(v1_dir, tmp_path)
    expected, _ = logits(v1_dir)  # no pack_dtype key
    edit_quantize_config(folder, pack_dtype="int32")
    assert torch.equal(logits(folder)[0], expected)
    for value in ("int16", "int64", "float16"):
        edit_quantize_config(folder, pack_dtype=value)
        assert error_of(folder) == (f"{folder / 'quantize_config.json'}: pack_dtype {value!r} is not supported; "
                                    f"talis reads GPTQ weights packed in int32 words")


# ---------------------------------------------------------------- lm_head
def test_lm_head_key_must_agree_with_the_weights(tmp_path, model, v1_dir):
    """GPTQModel and AutoGPTQ build the head from the config and then fail on the tensors; talis says which."""
    fp16_head = copy_of(v1_dir, tmp_path, "fp16_head")
    qc = fp16_head / "quantize_config.json"
    edit_quantize_config(fp16_head, lm_head=False)
    assert torch.equal(logits(fp16_head)[0], logits(v1_dir)[0])
    edit_quantize_config(fp16_head, lm_head=True)
    assert error_of(fp16_head) == (f"{qc}: lm_head is true but the weights hold no quantized lm_head "
                                   f"(lm_head.qweight); the config and the weights don't belong together — set \"lm_head\": false if "
                                   f"the head is fp16")
    quantized_head = tmp_path / "quantized_head"
    save_gptq(model, quantized_head, bits=4, group_size=32, sym=False, lm_head=True)
    expected, engine = logits(quantized_head)
    assert engine.info["quantization"]["lm_head"] is True
    edit_quantize_config(quantized_head, lm_head=None)  # no key (AutoGPTQ 0.7): the weights decide
    assert torch.equal(logits(quantized_head)[0], expected)
    edit_quantize_config(quantized_head, lm_head=False)
    assert error_of(quantized_head) == (
        f"{quantized_head / 'quantize_config.json'}: lm_head is false but the weights hold a quantized lm_head "
        f"(lm_head.qweight); the config and the weights don't belong together — set \"lm_head\": true if they do")


# ---------------------------------------------------------------- shard indexes (AutoGPTQ names them by base name)
def shard_copy(v1_dir, tmp_path, base_name: str, index_name=None, model_file_base_name=None):
    """v1_dir's weights as three shards `<base_name>-0000i-of-00003.safetensors` with an index `index_name`
    (default `<base_name>.safetensors.index.json`; False: none) and the quantize config's model_file_base_name."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for f in v1_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    write_shards(load_file(str(v1_dir / "model.safetensors")), folder, 3, base_name, index_name)
    edit_quantize_config(folder, model_file_base_name=model_file_base_name or base_name)
    return folder


@pytest.mark.parametrize("index_name,model_file_base_name", [
    (None, None),  # AutoGPTQ: gptq_model-4bit-32g.safetensors.index.json, found by the config's base name
    (None, "model"),  # the base name names no file: the folder's only index
    ("model.safetensors.index.json", None),  # HF's name beside an AutoGPTQ base name
])
def test_shards_load_by_their_index(tmp_path, v1_dir, index_name, model_file_base_name):
    folder = shard_copy(v1_dir, tmp_path, "gptq_model-4bit-32g", index_name, model_file_base_name)
    got, engine = logits(folder)
    assert len(engine.loaded.files) == 3
    assert torch.equal(got, logits(v1_dir)[0])


def test_several_indexes_are_named(tmp_path, v1_dir):
    folder = shard_copy(v1_dir, tmp_path, "gptq_model-4bit-32g", model_file_base_name="gptq_model-4bit-128g")
    shutil.copy(folder / "gptq_model-4bit-32g.safetensors.index.json", folder / "old.safetensors.index.json")
    assert error_of(folder) == (f"{folder}: several shard indexes (gptq_model-4bit-32g.safetensors.index.json, "
                                f"old.safetensors.index.json); keep the one of these weights, or name it by "
                                f"model_file_base_name in the quantize config")
    edit_quantize_config(folder, model_file_base_name="gptq_model-4bit-32g")  # the base name settles it
    assert torch.equal(logits(folder)[0], logits(v1_dir)[0])


def test_shards_without_an_index_never_suggest_checkpoint(tmp_path, v1_dir):
    folder = shard_copy(v1_dir, tmp_path, "gptq_model-4bit-32g", index_name=False)
    expected = (f"{folder}: gptq_model-4bit-32g-00001-of-00003.safetensors is one shard of a model split in files, "
                f"but there is no shard index (*.safetensors.index.json) to join them; copy the index file that came "
                f"with the shards")
    assert error_of(folder) == expected
    result = run_talis("generate", "-m", folder, "-p", "hello", "-n", "2")
    assert result.returncode == 1 and result.stdout == b""
    assert one_line_error(result) == f"error: {expected}\n"
    (folder / "gptq_model-4bit-32g-00002-of-00003.safetensors").unlink()
    (folder / "gptq_model-4bit-32g-00003-of-00003.safetensors").unlink()  # one shard alone is no model either
    assert error_of(folder) == expected


def test_unrelated_safetensors_files_ask_for_checkpoint(tmp_path, v1_dir):
    folder = copy_of(v1_dir, tmp_path)
    edit_quantize_config(folder, model_file_base_name="gptq_model-4bit-32g")
    shutil.copy(folder / "model.safetensors", folder / "model-old.safetensors")
    assert error_of(folder) == (f"{folder}: several .safetensors files (model-old.safetensors, model.safetensors) "
                                f"that are not shards of one model; pass the one to use with --checkpoint")

"""The model folder's generation_config.json: its end-of-sequence ids and its suggested sampling values.

The file is Hugging Face's GenerationConfig as `save_pretrained` writes it (plain JSON beside config.json), so it is
read without loading the model. `eos_token_id` is an int or a list (Llama-3-Instruct: `[<|end_of_text|>,
<|eot_id|>]`); the sampling keys are HF's (`do_sample`, `temperature`, `top_k`, `top_p`, `min_p`, `typical_p`,
`repetition_penalty`; `do_sample: false` means greedy). Other keys (`max_length`, `pad_token_id`, ...) are ignored.
"""

from __future__ import annotations

from pathlib import Path

from .errors import TalisError
from .json_files import read_json_object

FILE_NAME = "generation_config.json"
# HF GenerationConfig keys that suggest how to sample, in the order `talis info` shows them.
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
                 "max_new_tokens")


def read_generation_config(model_dir: Path | str, error: type[TalisError] = TalisError) -> dict:
    """The parsed generation_config.json of `model_dir`, or {} when the folder has none.

    Raises `error` with one line naming the file when it is not a JSON object or its eos_token_id is no token id.
    """
    path = Path(model_dir) / FILE_NAME
    if not path.is_file():
        return {}
    data = read_json_object(path, error)
    eos_token_ids(data, str(path), error)
    return data


def eos_token_ids(data: dict, source: str = FILE_NAME, error: type[TalisError] = TalisError) -> list[int]:
    """The `eos_token_id` of a generation config (int, list of ints, or absent) as a list.

    Raises `error` naming `source` for any other value.
    """
    value = data.get("eos_token_id")
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise error(f"{source}: eos_token_id = {value!r} is not a token id or a list of token ids; fix the file")
    return values


def suggested_sampling(data: dict) -> dict:
    """The sampling values a generation config suggests (HF names and values, null ones left out)."""
    return {key: data[key] for key in SAMPLING_KEYS if data.get(key) is not None}

"""Chat templates: the built-ins against the same formats written as Jinja and rendered by transformers'
apply_chat_template (an independent renderer), plus the choice between the tokenizer's own and the built-ins."""

import random

import pytest

from talis_cli.chat_templates import BUILTIN_TEMPLATES, TEMPLATE_CHOICES, check_template_spec, resolve_template
from talis_cli.errors import UsageError
from tests.tiny_models import TOKENIZER_DIR

# The documented formats (see the chat-template notes), as the Jinja a model would ship in tokenizer_config.json.
JINJA_FORMATS = {
    "chatml": (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{% for m in turns %}{% if m['role'] == 'user' %}"
        "{% if loop.first and system %}{% set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + m['content'] | trim %}"
        "{% else %}{% set content = m['content'] | trim %}{% endif %}"
        "{{ bos_token }}[INST] {{ content }} [/INST]"
        "{% else %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}{% endfor %}"
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)


def random_conversation(seed: int, with_system: bool) -> list:
    rng = random.Random(seed)
    words = ["light", "waters", " firmament ", "evening", "morning\nday", "seed", "  herb", "fruit"]
    turns = rng.randint(1, 4)
    messages = [{"role": "system", "content": " ".join(rng.sample(words, 3))}] if with_system else []
    for turn in range(turns):
        messages.append({"role": "user", "content": " ".join(rng.sample(words, rng.randint(1, 4)))})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": " ".join(rng.sample(words, rng.randint(1, 4)))})
    return messages


@pytest.mark.parametrize("name", sorted(JINJA_FORMATS))
@pytest.mark.parametrize("seed", range(4))
def test_builtins_match_the_format_rendered_by_transformers(tokenizer, name, seed):
    tokenizer.chat_template = JINJA_FORMATS[name]
    try:
        for with_system in (False, True):
            messages = random_conversation(seed, with_system)
            reference = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ours = BUILTIN_TEMPLATES[name].render(messages, tokenizer.bos_token, tokenizer.eos_token)
            assert ours == reference
    finally:
        tokenizer.chat_template = None


def test_auto_prefers_the_tokenizers_own_template(tokenizer):
    assert resolve_template(None, tokenizer).name == "raw"  # this tokenizer ships none
    with pytest.raises(UsageError, match="has no chat template"):
        resolve_template("tokenizer", tokenizer)
    tokenizer.chat_template = JINJA_FORMATS["chatml"]
    try:
        messages = random_conversation(7, True)
        own = resolve_template("auto", tokenizer)
        assert own.name == "tokenizer"
        assert own.render(messages) == tokenizer.apply_chat_template(messages, tokenize=False,
                                                                      add_generation_prompt=True)
    finally:
        tokenizer.chat_template = None


def test_a_tokenizer_template_that_refuses_a_conversation_is_a_usage_error(tokenizer):
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('Conversation roles must "
                               "alternate user/assistant') }}{% endif %}{{ messages[0]['content'] }}")
    try:
        own = resolve_template("auto", tokenizer)
        assert own.render([{"role": "user", "content": "hi"}]) == "hi"
        with pytest.raises(UsageError, match="refused this conversation.*roles must alternate.*--template"):
            own.render([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
    finally:
        tokenizer.chat_template = None


def test_a_jinja_file_renders_like_transformers(tokenizer, tmp_path):
    path = tmp_path / "llama2.jinja"
    path.write_text(JINJA_FORMATS["llama2"], encoding="utf-8")
    messages = random_conversation(3, True)
    from_file = resolve_template(str(path), tokenizer).render(messages, tokenizer.bos_token, tokenizer.eos_token)
    tokenizer.chat_template = JINJA_FORMATS["llama2"]
    try:
        assert from_file == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    finally:
        tokenizer.chat_template = None


def test_raw_keeps_every_turn_in_order_and_stops_at_the_next_user_line(tokenizer):
    from talis_cli.generation import StopStringFilter

    messages = random_conversation(11, True)
    text = BUILTIN_TEMPLATES["raw"].render(messages, "<s>")
    position = 0
    for message in messages:
        position = text.index(message["content"].strip(), position)
    assert text.startswith("<s>" + messages[0]["content"].strip()) and text.endswith("\nAssistant:")
    visible, stopped = StopStringFilter(BUILTIN_TEMPLATES["raw"].stop).feed(" Amen.\nUser: and more")
    assert stopped and visible == " Amen.\n"


def test_bad_templates_are_one_line_usage_errors(tokenizer, tmp_path):
    for name in TEMPLATE_CHOICES:
        check_template_spec(name)
    with pytest.raises(UsageError, match="unknown chat template 'vicuna'"):
        check_template_spec("vicuna")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }", encoding="utf-8")
    with pytest.raises(UsageError, match="does not compile") as info:
        resolve_template(str(broken), tokenizer)
    assert "\n" not in str(info.value)
    failing = tmp_path / "failing.jinja"
    failing.write_text("{{ raise_exception('only user turns') }}", encoding="utf-8")
    with pytest.raises(UsageError, match="only user turns"):
        resolve_template(str(failing), tokenizer).render([{"role": "user", "content": "hi"}])

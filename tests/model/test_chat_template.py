"""Chat templates render exactly as transformers' ``apply_chat_template`` renders them.

The Qwen3 and Gemma 3 template texts in tests/fixtures/templates were written from knowledge of
the published templates (no network here); see the README beside them.
"""

import datetime
import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers.models import WordLevel

from kestrel.errors import KestrelError
from model.chat_template import KESTREL_TEMPLATE, ChatTemplate, effort_line

TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "templates"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city. Returns <b>°C</b> & conditions.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Zürich"}},
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search", "description": "Web search", "parameters": {"type": "object", "properties": {}}
    },
}

CONVERSATIONS = {
    "plain": [{"role": "user", "content": "Hello! Wie geht's? 你好"}],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ],
    "reasoning_last_turn": [
        {"role": "user", "content": "Is 17 prime?"},
        {"role": "assistant", "content": "Yes.", "reasoning_content": "Check divisors 2, 3: none.\n"},
    ],
    "reasoning_earlier_turn_dropped": [
        {"role": "user", "content": "Is 17 prime?"},
        {"role": "assistant", "content": "Yes.", "reasoning_content": "Check 2, 3."},
        {"role": "user", "content": "And 21?"},
    ],
    "tools": [
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Weather in Zürich and Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Two cities, two calls.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            ],
        },
        {"role": "tool", "content": json.dumps({"temp": 3, "sky": "snow"})},
        {"role": "tool", "content": json.dumps({"temp": 9, "sky": "rain"})},
        {"role": "assistant", "content": "Zürich 3 °C snow; Paris 9 °C rain."},
        {"role": "user", "content": "Thanks"},
    ],
    "tool_turn_pending": [
        {"role": "user", "content": "Search kestrels"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"q": "kestrel"}}}],
        },
        {"role": "tool", "content": "Kestrels are small falcons."},
    ],
}


def _hf_tokenizer(template: str, bos: str, eos: str):
    """A transformers fast tokenizer around a tiny word-level vocabulary and ``template``."""
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, bos: 1, eos: 2, "hello": 3}
    backend = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token="<unk>", chat_template=template
    )


def _reference(template: str, bos: str, eos: str, messages, tools=None, **kwargs) -> str:
    return _hf_tokenizer(template, bos, eos).apply_chat_template(
        messages, tools=tools, tokenize=False, **kwargs
    )


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_qwen3_template_matches_transformers(name, add_generation_prompt):
    source = (TEMPLATES / "qwen3.jinja").read_text()
    tools = [WEATHER_TOOL, SEARCH_TOOL] if name.startswith("tool") else None
    ours = ChatTemplate(source, bos_token=None, eos_token="<|im_end|>").render(
        CONVERSATIONS[name], tools=tools, add_generation_prompt=add_generation_prompt
    )
    ref = _reference(source, "<|endoftext|>", "<|im_end|>", CONVERSATIONS[name], tools,
                     add_generation_prompt=add_generation_prompt)
    assert ours == ref
    if tools:
        # tojson as transformers defines it: no HTML escaping, unicode kept.
        assert "<b>°C</b> & conditions" in ours and "Zürich" in ours


def test_qwen3_enable_thinking_false_matches_transformers():
    source = (TEMPLATES / "qwen3.jinja").read_text()
    messages = CONVERSATIONS["plain"]
    ours = ChatTemplate(source).render(messages, enable_thinking=False)
    assert ours == _reference(source, "<s>", "</s>", messages, add_generation_prompt=True, enable_thinking=False)
    assert ours.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "  Hi there  "}],
        [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is this? "}]},
        ],
    ],
)
def test_gemma3_template_matches_transformers(messages):
    source = (TEMPLATES / "gemma3.jinja").read_text()
    ours = ChatTemplate(source, bos_token="<bos>", eos_token="<eos>").render(messages)
    assert ours == _reference(source, "<bos>", "<eos>", messages, add_generation_prompt=True)
    assert ours.startswith("<bos><start_of_turn>user\n")


def test_gemma3_rejects_non_alternating_roles_like_transformers():
    source = (TEMPLATES / "gemma3.jinja").read_text()
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(KestrelError, match="roles must alternate"):
        ChatTemplate(source, bos_token="<bos>").render(messages)
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError):
        _reference(source, "<bos>", "<eos>", messages)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_kestrel_template_agrees_with_qwen3(name):
    """Kestrel's own template must give converted Qwen3 models and kestrel-nano one token grammar."""
    tools = [WEATHER_TOOL, SEARCH_TOOL] if name.startswith("tool") else None
    qwen3 = ChatTemplate((TEMPLATES / "qwen3.jinja").read_text())
    kestrel = ChatTemplate(KESTREL_TEMPLATE)
    for flags in ({}, {"enable_thinking": False}, {"add_generation_prompt": False}):
        assert kestrel.render(CONVERSATIONS[name], tools=tools, **flags) == qwen3.render(
            CONVERSATIONS[name], tools=tools, **flags
        )


def test_kestrel_template_formats_tool_calls_and_results():
    text = ChatTemplate(KESTREL_TEMPLATE).render(CONVERSATIONS["tools"][:5], tools=[WEATHER_TOOL])
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nUse tools when useful.\n\n# Tools")
    assert json.dumps(WEATHER_TOOL, ensure_ascii=False) in system
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<think>\nTwo cities, two calls.\n</think>\n\n" in text
    # Consecutive tool results share one user turn.
    assert text.count("<|im_start|>user\n<tool_response>\n") == 1
    assert text.count("<tool_response>") == 2
    assert text.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_reasoning_aliases_are_accepted():
    """``reasoning`` / ``thinking`` fields reach the template as ``reasoning_content`` (as in transformers)."""
    template = ChatTemplate(KESTREL_TEMPLATE)
    base = [{"role": "user", "content": "q"}]
    a = template.render(
        base + [{"role": "assistant", "content": "a", "reasoning": "r"}], add_generation_prompt=False
    )
    b = template.render(base + [{"role": "assistant", "content": "a", "reasoning_content": "r"}],
                        add_generation_prompt=False)
    assert a == b and "<think>\nr\n</think>" in a


def test_helpers_strftime_loopcontrols_and_special_tokens():
    source = (
        "{{ bos_token }}{{ strftime_now('%Y') }}|"
        "{% for m in messages %}{% if loop.index0 == 2 %}{% break %}{% endif %}"
        "{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }};{% endfor %}{{ eos_token }}"
    )
    messages = [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "user", "content": "x"}
    ]
    out = ChatTemplate(source, bos_token="<B>", eos_token="<E>").render(messages)
    assert out == f"<B>{datetime.datetime.now().year}|u;<E>"
    # Caller kwargs override the special tokens, as in transformers.
    assert ChatTemplate("{{ bos_token }}").render([], bos_token="<X>") == "<X>"


def test_invalid_template_names_the_problem():
    with pytest.raises(KestrelError, match=r"invalid chat template: line 2"):
        ChatTemplate("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(KestrelError, match="must be a string"):
        ChatTemplate(None)


def test_sandbox_blocks_python_internals():
    with pytest.raises(KestrelError, match="underscore"):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([])
    with pytest.raises(KestrelError):
        ChatTemplate("{{ messages.append(1) }}").render([])  # immutable sandbox: no mutation of inputs


def test_render_rejects_bad_messages():
    with pytest.raises(ValueError, match="messages"):
        ChatTemplate(KESTREL_TEMPLATE).render("hello")
    with pytest.raises(ValueError, match="tools"):
        ChatTemplate(KESTREL_TEMPLATE).render([], tools=["get_weather"])


CHATML_WITHOUT_TOOLS = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_shows_tools_tells_templates_that_render_tools_from_those_that_drop_them():
    assert ChatTemplate(KESTREL_TEMPLATE).shows_tools
    assert ChatTemplate((TEMPLATES / "qwen3.jinja").read_text()).shows_tools
    assert not ChatTemplate(CHATML_WITHOUT_TOOLS).shows_tools  # SmolLM2-135M-Instruct's kind
    # A template that refuses the probe conversation counts as showing tools: the real render
    # then reports its own error instead of a misleading "ignores tools".
    assert ChatTemplate("{{ raise_exception('system message first') }}").shows_tools


def test_kestrel_template_says_the_reasoning_effort_at_the_end_of_the_system_turn():
    """``reasoning_effort`` is the template hint: the system turn's last line, the rest unchanged,
    and the same text as a system message that says it (what the training data writes)."""
    template = ChatTemplate(KESTREL_TEMPLATE)
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    bare = [{"role": "user", "content": "q"}]
    for tools in (None, [WEATHER_TOOL]):
        hinted = template.render(with_system, tools=tools, reasoning_effort="low")
        said = template.render([{"role": "system", "content": "Be brief.\n" + effort_line("low")}, bare[0]],
                               tools=tools)
        assert hinted == said
        assert hinted.startswith("<|im_start|>system\nBe brief.\nReasoning effort: low.")
        # No system message: the hint opens a system turn of its own.
        alone = template.render(bare, tools=tools, reasoning_effort="auto")
        assert alone == template.render([{"role": "system", "content": effort_line("auto")}, bare[0]], tools=tools)
        # No hint (None or empty): the template renders as Qwen3's does.
        for absent in ({}, {"reasoning_effort": None}, {"reasoning_effort": ""}):
            assert template.render(with_system, tools=tools, **absent) == template.render(with_system, tools=tools)
    # Qwen3's own template reads no such variable: the hint changes nothing there.
    qwen3 = ChatTemplate((TEMPLATES / "qwen3.jinja").read_text())
    assert qwen3.render(with_system, reasoning_effort="low") == qwen3.render(with_system)

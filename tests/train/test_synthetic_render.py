"""render_kestrel: the same text as the chat templates, trainable exactly on the model's output."""

from pathlib import Path

import pytest

from model.chat_template import KESTREL_TEMPLATE, ChatTemplate
from train.synthetic import TASKS, generate, mixture, render_kestrel

ALL = {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
QWEN3 = Path(__file__).parents[1] / "fixtures" / "templates" / "qwen3.jinja"


@pytest.fixture(scope="module")
def examples():
    out = list(mixture(21, ALL, n=250))
    out += [generate(t, level=lv, seed=lv) for t in TASKS for lv in (1, 5)]
    out += [generate("fc_multiturn", level=5, seed=s) for s in range(10)]
    return out


def test_text_matches_the_kestrel_chat_template(examples):
    template = ChatTemplate(KESTREL_TEMPLATE)
    for ex in examples:
        text = "".join(t for t, _ in render_kestrel(ex))
        assert text == template.render(ex.messages, tools=ex.tools or None, add_generation_prompt=False)


@pytest.mark.skipif(not QWEN3.exists(), reason="Qwen3 template fixture not present")
def test_text_matches_qwens_own_template(examples):
    template = ChatTemplate(QWEN3.read_text())
    for ex in examples[:80]:
        text = "".join(t for t, _ in render_kestrel(ex))
        assert text == template.render(ex.messages, tools=ex.tools or None, add_generation_prompt=False)


def _final_assistant_indices(messages):
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > last_user]


def test_trainable_segments_are_exactly_the_final_assistant_outputs(examples):
    for ex in examples:
        segs = render_kestrel(ex)
        text = "".join(t for t, _ in segs)
        trainable = [t for t, flag in segs if flag]
        expected = _final_assistant_indices(ex.messages)
        assert len(trainable) == len(expected)
        pos = 0
        for seg, flag in segs:
            if flag:
                # Starts right after an assistant header and ends with the turn's <|im_end|>.
                assert text[:pos].endswith("<|im_start|>assistant\n")
                assert seg.endswith("<|im_end|>") and seg.count("<|im_end|>") == 1
                assert "<|im_start|>" not in seg and "<tool_response>" not in seg
            pos += len(seg)
        for i, seg in zip(expected, trainable):
            m = ex.messages[i]
            assert m["reasoning_content"].strip() in seg
            assert (m.get("content") or "") in seg
            for tc in m.get("tool_calls", []):
                assert f'"name": "{tc["function"]["name"]}"' in seg
        masked = "".join(t for t, flag in segs if not flag)
        for m in ex.messages:
            if m["role"] in ("system", "user", "tool"):
                assert m["content"] in masked
        for t in ex.tools:
            assert t["function"]["name"] in masked


def test_history_turns_drop_reasoning_and_are_masked_unless_asked():
    ex = generate("fc_multiturn", level=4, seed=3)
    segs = render_kestrel(ex)
    history = [m for i, m in enumerate(ex.messages)
               if m["role"] == "assistant" and i not in _final_assistant_indices(ex.messages)]
    assert history
    text = "".join(t for t, _ in segs)
    for m in history:
        assert m["reasoning_content"] not in text  # As the chat template renders a continued chat.
    with_history = render_kestrel(ex, train_history=True)
    assert "".join(t for t, _ in with_history) == text
    n_assistant = sum(m["role"] == "assistant" for m in ex.messages)
    assert sum(flag for _, flag in with_history) == n_assistant
    assert sum(flag for _, flag in segs) == n_assistant - len(history)


def test_no_tools_example_has_no_tool_block():
    ex = generate("physics", level=2, seed=0, tools=False)
    segs = render_kestrel(ex)
    text = "".join(t for t, _ in segs)
    assert "<tools>" not in text and text.startswith("<|im_start|>system\n")
    assert [flag for _, flag in segs] == [False, True, False]
    assert segs[1][0].startswith("<think>\n") and segs[1][0].endswith("<|im_end|>")

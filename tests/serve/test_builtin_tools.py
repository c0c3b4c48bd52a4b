"""The server's built-in tools are offered to the model in the very words kestrel-nano was trained
with: the chat template renders the same tools block for an API request as for a training example."""

from model.chat_template import KESTREL_TEMPLATE, ChatTemplate
from serve.api.convert import BUILTIN_TOOLS
from serve.engine import _tool_schema
from train.synthetic import BUILTIN_TOOLS as TRAINED_TOOLS


def test_served_builtin_tools_render_as_the_training_data_offers_them():
    served = [_tool_schema(BUILTIN_TOOLS[name]) for name in ("calculator", "python")]
    assert served == [dict(t) for t in TRAINED_TOOLS]
    template = ChatTemplate(KESTREL_TEMPLATE)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    assert template.render(messages, tools=served) == template.render(messages, tools=list(TRAINED_TOOLS))

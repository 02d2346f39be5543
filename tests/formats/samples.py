"""Model outputs to parse: real ones recorded from Qwen2.5-Coder-0.5B-Instruct Q4_K_M (greedy, through
ggufchat's engine and the model's own template with tools), and the documented formats of the other
families. Each sample says what a correct parse gives, so the streaming tests can cut it anywhere."""

from __future__ import annotations

from dataclasses import dataclass, field

from ggufchat.formats import ToolSpec

WEATHER = ToolSpec("get_weather", "Get the current weather in a city",
                   {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
TIME = ToolSpec("get_time", "Get the current time in a timezone",
                {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]})
TOOLS = (WEATHER, TIME)

PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
PARIS_ARGS = '{"city": "Paris"}'


@dataclass(frozen=True)
class Sample:
    name: str
    text: str
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments JSON text)
    content: str = ""
    reasoning: str = ""
    reasoning_split: bool = True
    in_reasoning: bool = False
    family: str = "hermes"


SAMPLES = [
    # Real Qwen2.5-Coder-0.5B outputs.
    Sample("qwen-bare", PARIS, [("get_weather", PARIS_ARGS)]),
    Sample("qwen-fenced", f"```json\n{PARIS}\n```", [("get_weather", PARIS_ARGS)]),
    Sample("qwen-tagged", f"<tool_call>\n{PARIS}\n</tool_call>", [("get_weather", PARIS_ARGS)]),
    Sample("qwen-fenced-pretty",
           '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```',
           [("get_weather", PARIS_ARGS)]),
    Sample("qwen-fenced-time",
           '```json\n{\n  "name": "get_time",\n  "arguments": {\n    "timezone": "Asia/Tokyo"\n  }\n}\n```',
           [("get_time", '{"timezone": "Asia/Tokyo"}')]),
    Sample("qwen-no-call", "Sea whispers,\nWhispers of the sea,\nWhispers of the sea.",
           content="Sea whispers,\nWhispers of the sea,\nWhispers of the sea."),
    # Asked for a JSON cat, it wrote a call-shaped object naming a tool that does not exist: content.
    Sample("qwen-unknown-tool",
           '```json\n{\n  "name": "cat",\n  "arguments": {\n    "name": "Buddy",\n    "age": 3\n  }\n}\n```',
           content='```json\n{\n  "name": "cat",\n  "arguments": {\n    "name": "Buddy",\n    "age": 3\n  }\n}\n```'),
    # Hermes / Qwen2.5 as their templates teach, one and several calls.
    Sample("hermes-parallel",
           f'<tool_call>\n{PARIS}\n</tool_call>\n<tool_call>\n{{"name": "get_time", "arguments": '
           '{"timezone": "Europe/Paris"}}\n</tool_call>',
           [("get_weather", PARIS_ARGS), ("get_time", '{"timezone": "Europe/Paris"}')]),
    Sample("text-before-call", f"Let me check the weather.\n<tool_call>\n{PARIS}\n</tool_call>",
           [("get_weather", PARIS_ARGS)], content="Let me check the weather.\n"),
    Sample("text-after-call", f"{PARIS}\nI will tell you once I know.",
           [("get_weather", PARIS_ARGS)], content="\nI will tell you once I know."),
    Sample("hermes-string-arguments",
           '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>',
           [("get_weather", PARIS_ARGS)]),
    Sample("hermes-unknown-tool",
           '<tool_call>\n{"name": "get_stock", "arguments": {"ticker": "ACME"}}\n</tool_call>',
           content='<tool_call>\n{"name": "get_stock", "arguments": {"ticker": "ACME"}}\n</tool_call>'),
    Sample("hermes-schema-invalid",
           '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n</tool_call>',
           content='<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n</tool_call>'),
    Sample("bare-schema-invalid", '{"name": "get_weather", "arguments": {"city": 75}}',
           content='{"name": "get_weather", "arguments": {"city": 75}}'),
    Sample("json-answer", '{"city": "Paris", "population": 2102650}',
           content='{"city": "Paris", "population": 2102650}'),
    Sample("unclosed-call", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
           content='<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),
    Sample("markup-lookalikes", "Use <b>bold</b>, [links](x) and `code` ``` here <tool_cal and [TOOL_CALL.",
           content="Use <b>bold</b>, [links](x) and `code` ``` here <tool_cal and [TOOL_CALL."),
    Sample("python-fence-is-content", "```python\nprint({'name': 1})\n```",
           content="```python\nprint({'name': 1})\n```"),
    Sample("one-valid-one-invalid",
           f'<tool_call>\n{PARIS}\n</tool_call>\n<tool_call>\n{{"name": "nope", "arguments": {{}}}}\n</tool_call>',
           [("get_weather", PARIS_ARGS)],
           content='\n<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'),
    Sample("escapes-in-arguments",
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Qu\\u00e9bec \\"}\\" {[<"}}\n</tool_call>',
           [("get_weather", '{"city": "Québec \\"}\\" {[<"}')]),
    # Llama 3.x: "parameters", with or without <|python_tag|>.
    Sample("llama3-bare", '{"name": "get_weather", "parameters": {"city": "Paris"}}',
           [("get_weather", PARIS_ARGS)], family="llama3"),
    Sample("llama3-python-tag", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
           [("get_weather", PARIS_ARGS)], family="llama3"),
    # Mistral: an array after [TOOL_CALLS] (Nemo, with ids), or name[ARGS]{…} (Small 3.2, Devstral).
    Sample("mistral-array",
           '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}, '
           '{"name": "get_time", "arguments": {"timezone": "UTC"}, "id": "f5g6h7i8j"}]',
           [("get_weather", PARIS_ARGS), ("get_time", '{"timezone": "UTC"}')], family="mistral"),
    Sample("mistral-args",
           '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]'
           '{"timezone": "UTC"}',
           [("get_weather", PARIS_ARGS), ("get_time", '{"timezone": "UTC"}')], family="mistral"),
    # Reasoning (DeepSeek-R1 / Qwen3), then an answer or a call.
    Sample("think-answer", "<think>\nThe user greets me.\n\nI greet back.\n</think>\n\nHello!",
           content="Hello!", reasoning="The user greets me.\n\nI greet back."),
    Sample("think-then-call", f"<think>\nI need the weather tool.\n</think>\n\n<tool_call>\n{PARIS}\n</tool_call>",
           [("get_weather", PARIS_ARGS)], reasoning="I need the weather tool."),
    Sample("think-then-bare-call", f"<think>\nTool time.\n</think>\n\n{PARIS}",
           [("get_weather", PARIS_ARGS)], reasoning="Tool time."),
    Sample("opened-think", "The prompt opened the tag.\n</think>\n\nAnswer.", content="Answer.",
           reasoning="The prompt opened the tag.", in_reasoning=True),
    Sample("opened-think-call", f"Call it.</think>{PARIS}", [("get_weather", PARIS_ARGS)],
           reasoning="Call it.", in_reasoning=True),
    Sample("think-unsplit", f"<think>\nhmm\n</think>\n\n{PARIS}", [("get_weather", PARIS_ARGS)],
           content="<think>\nhmm\n</think>", reasoning_split=False),
    Sample("call-inside-think-is-reasoning", f"<think>\n<tool_call>{PARIS}</tool_call>\n</think>\nNo.",
           content="No.", reasoning=f"<tool_call>{PARIS}</tool_call>"),
]

"""Output formats: model text in, typed events out (content, reasoning, tool calls), plus the
grammars that make a model write a tool call. Pure functions of text; the engine builds samplers
from what the grammar functions return, and every front end (OpenAI and Ollama routes, the terminal
chat) consumes the events, so none of them parses model text itself."""

from ggufchat.formats.events import (
    Content,
    OutputEvent,
    Reasoning,
    ToolCall,
    ToolCallArguments,
    ToolCallStart,
    ToolSpec,
    new_call_id,
)
from ggufchat.formats.families import FAMILIES, opens_reasoning, tool_family
from ggufchat.formats.grammar import lazy_tool_grammar, tool_grammar
from ggufchat.formats.parser import OutputFormat, OutputParser, parse_output

__all__ = [
    "Content", "Reasoning", "ToolCallStart", "ToolCallArguments", "OutputEvent", "ToolSpec", "ToolCall",
    "new_call_id", "FAMILIES", "tool_family", "opens_reasoning", "OutputFormat", "OutputParser", "parse_output",
    "tool_grammar", "lazy_tool_grammar",
]

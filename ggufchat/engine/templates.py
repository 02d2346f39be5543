"""Chat templates: the GGUF's own Jinja template, named built-ins, or a template file.

Rendering produces segments, each marked as template text or message content, so the engine can
tokenize template text with special-token parsing on and content with it off: a user message that
contains "<|im_end|>\n<|im_start|>system" stays plain text instead of forging a system turn.

Tools (OpenAI shape) go to a template that reads `tools`; a template that does not gets them in its
system message in the hermes format (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`), and a
template that does not render `tool_calls` gets the calls and the tool results of the history as that
same tagged text.

What counts as content: message content, and (when the template only prints them, which is checked)
tool-call names, ids and argument strings, tool messages' names and ids, tool names and descriptions.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.sandbox

from ggufchat.errors import TemplateError

log = logging.getLogger(__name__)

# Built-in templates, written for the same Jinja settings Hugging Face uses (trim_blocks, lstrip_blocks).
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_QWEN = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}" + _CHATML
)
_LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
_LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = none %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system is not none %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
_GEMMA = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + message['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
_MISTRAL = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (prefix if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
_PHI3 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "qwen": _QWEN,
    "llama-3": _LLAMA3,
    "llama-2": _LLAMA2,
    "gemma": _GEMMA,
    "mistral": _MISTRAL,
    "phi-3": _PHI3,
}
_ALIASES = {
    "qwen2": "qwen", "qwen2.5": "qwen", "llama3": "llama-3", "llama2": "llama-2", "gemma2": "gemma",
    "gemma3": "gemma", "phi3": "phi-3", "im_start": "chatml",
}

# Placeholders: private-use characters that never come out of a template by themselves. Untrusted text
# goes into the template as OPEN nonce.n CLOSE (a fresh random nonce per render, so text from a client
# cannot forge one); the tojson filter re-marks those it prints inside a JSON string as JSON (or
# JSON_ASCII, under ensure_ascii) so each comes back out escaped the way the template printed it.
_OPEN, _CLOSE, _JSON, _JSON_ASCII = "\ue000", "\ue001", "\ue002", "\ue003"
_NON_ASCII = re.compile("[^\x00-\x7e]")
_current_mask: ContextVar[_Mask | None] = ContextVar("ggufchat_template_mask", default=None)

# The generic tool format (hermes tags), for templates that know nothing of tools. ggufchat.formats'
# "generic" family parses exactly this back out of the model's answer.
_TOOLS_INTRO = "# Tools\n\nYou can call these functions:\n<tools>"
_TOOLS_CALL_FORMAT = (
    "\n</tools>\n\nTo call a function, reply with only this, one block per call:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

Parts = list[tuple[str, bool]]  # (text, is_untrusted): a message body built from template text and content


@dataclass(frozen=True)
class Segment:
    text: str
    is_content: bool  # True: message content, tokenized with special-token parsing off


class Vocab(Protocol):
    """What tokenize_segments needs of a tokenizer (the engine's Tokenizer)."""

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = False) -> list[int]: ...
    def piece(self, token: int) -> bytes: ...
    def special_text(self, token: int) -> str: ...


def tokenize_segments(segments: list[Segment], vocab: Vocab) -> list[int]:
    """Token ids for rendered segments (no BOS), as llama.cpp tokenizes a whole prompt (what llama-server
    counts), except that only template text can produce control tokens.

    Template text is cut at its control tokens; the text between them, template text and content
    alike, is tokenized as one run with special-token parsing off. So BPE sees the word boundaries the
    whole prompt has ('city.",' is one token, not '.' then '",') and "<|im_end|>" in content is still
    plain text. A template segment whose cut does not reproduce its own tokenization (a control token
    that strips the whitespace next to it, as Phi-3's do) is tokenized on its own, as before."""
    tokens: list[int] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            tokens.extend(vocab.tokenize("".join(run), add_special=False, parse_special=False))
            run.clear()

    for seg in segments:
        if seg.is_content:
            run.append(seg.text)
            continue
        ids = vocab.tokenize(seg.text, add_special=False, parse_special=True)
        pieces: list[str | int] = []  # raw text between control tokens, and the control tokens
        pos = 0
        for token in ids:
            if vocab.piece(token):
                continue  # ordinary (or user-defined) token: part of the raw text
            text = vocab.special_text(token)
            at = seg.text.find(text, pos) if text else -1
            if at < 0:
                pieces = []
                break
            pieces += [seg.text[pos:at], token]
            pos = at + len(text)
        else:
            pieces.append(seg.text[pos:])
        alone = [t for p in pieces for t in (
            [p] if isinstance(p, int) else vocab.tokenize(p, add_special=False, parse_special=False))]
        if alone != ids:
            flush()
            tokens.extend(ids)
            continue
        for p in pieces:
            if isinstance(p, int):
                flush()
                tokens.append(p)
            elif p:
                run.append(p)
    flush()
    return tokens


def builtin_names() -> list[str]:
    return list(BUILTIN_TEMPLATES)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _ascii(text: str) -> str:
    return _NON_ASCII.sub(lambda m: json.dumps(m.group())[1:-1], text)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False, **_: Any) -> str:
    """Hugging Face's tojson (json.dumps, no HTML escaping), placeholder-aware."""
    text = json.dumps(value, ensure_ascii=False, indent=indent,
                      separators=tuple(separators) if separators else None, sort_keys=sort_keys)
    mask = _current_mask.get()
    if mask is None:
        return _ascii(text) if ensure_ascii else text
    mark = _JSON_ASCII if ensure_ascii else _JSON
    out, pos = [], 0
    for m in mask.raw_re.finditer(text):
        out += [_ascii(text[pos:m.start()]) if ensure_ascii else text[pos:m.start()], mark + m.group(1) + _CLOSE]
        pos = m.end()
    out.append(_ascii(text[pos:]) if ensure_ascii else text[pos:])
    return "".join(out)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class _Mask:
    """Hands out placeholders for untrusted text. Level 0 hands out none (the plain render), level 1
    masks message content (and the generic tool text built from it), level 2 also the tool fields."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.texts: list[str] = []
        self.fields = 0  # how many level-2 fields were masked
        self.nonce = str(secrets.randbits(48))
        self.raw_re = re.compile(f"{_OPEN}({self.nonce}\\.\\d+){_CLOSE}")
        self.any_re = re.compile(f"([{_OPEN}{_JSON}{_JSON_ASCII}]){self.nonce}\\.(\\d+){_CLOSE}")

    def content(self, text: str) -> str:
        if not text or self.level == 0:
            return text
        self.texts.append(text)
        return f"{_OPEN}{self.nonce}.{len(self.texts) - 1}{_CLOSE}"

    def field(self, text: Any) -> Any:
        if not isinstance(text, str) or self.level < 2 or not text:
            return text
        self.fields += 1
        return self.content(text)

    def parts(self, parts: Parts) -> str:
        return "".join(self.content(text) if untrusted else text for text, untrusted in parts)

    def values(self, value: Any) -> Any:
        """Every string value in a JSON tree (keys stay: templates look arguments up by name)."""
        if isinstance(value, dict):
            return {k: self.values(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.values(v) for v in value]
        return self.field(value)

    def descriptions(self, value: Any) -> Any:
        """The "description" strings in a JSON schema (types, names and enums stay: templates read them)."""
        if isinstance(value, dict):
            return {k: self.field(v) if k == "description" else self.descriptions(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.descriptions(v) for v in value]
        return value

    def split(self, text: str) -> list[Segment]:
        segments: list[Segment] = []

        def add(piece: str, is_content: bool) -> None:
            if not piece:
                return
            if segments and segments[-1].is_content == is_content:
                segments[-1] = Segment(segments[-1].text + piece, is_content)
            else:
                segments.append(Segment(piece, is_content))

        pos = 0
        for m in self.any_re.finditer(text):
            index = int(m.group(2))
            if index >= len(self.texts):
                continue
            value = self.texts[index]
            if m.group(1) == _JSON:
                value = json.dumps(value, ensure_ascii=False)[1:-1]
            elif m.group(1) == _JSON_ASCII:
                value = json.dumps(value)[1:-1]
            add(text[pos: m.start()], False)
            add(value, True)
            pos = m.end()
        add(text[pos:], False)
        return segments


# Messages.
def _content(i: int, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                raise TemplateError(f"message {i} has a content part this model cannot read")
        return "".join(parts)
    if not isinstance(content, str):
        raise TemplateError(f"message {i} content must be a string")
    return content


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _arguments(where: str, raw: Any) -> dict[str, Any]:
    """A tool call's arguments as an object: the templates print them with `| tojson`, so a JSON string
    is parsed first (printed as it came, it would be encoded twice)."""
    if isinstance(raw, dict):
        return raw
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}  # a call without arguments; some clients send "" or nothing
    if not isinstance(raw, str):
        raise TemplateError(f"{where}: function.arguments must be a JSON object or a string holding one")
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"{where}: function.arguments is not valid JSON ({exc.msg} at character {exc.pos})"
                            ) from None
    except ValueError as exc:
        raise TemplateError(f"{where}: function.arguments is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise TemplateError(f"{where}: function.arguments must be a JSON object, not {_json_kind(value)}")
    return value


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _tool_call(i: int, j: int, call: Any) -> dict[str, Any]:
    where = f"message {i} tool_calls[{j}]"
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise TemplateError(f"{where} needs a 'function' object")
    if call.get("type", "function") != "function":
        raise TemplateError(f"{where}: only tool calls of type 'function' are supported")
    function = call["function"]
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise TemplateError(f"{where} needs a string function.name")
    out: dict[str, Any] = {"type": "function",
                           "function": {"name": name, "arguments": _arguments(where, function.get("arguments"))}}
    if call.get("id") is not None:
        if not isinstance(call["id"], str):
            raise TemplateError(f"{where}: id must be a string")
        out["id"] = call["id"]
    return out


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accept OpenAI-style messages: content may be a string, None, or a list of text parts; assistant
    messages may carry tool_calls (arguments as an object or a JSON string; parsed here), tool messages
    tool_call_id and name."""
    if not isinstance(messages, list):
        raise TemplateError("messages must be a list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TemplateError(f"message {i} needs a string 'role'")
        msg = {**m, "content": _content(i, m.get("content"))}
        calls = msg.pop("tool_calls", None)
        if calls is not None and not isinstance(calls, list):
            raise TemplateError(f"message {i} tool_calls must be a list")
        if calls:
            if m["role"] != "assistant":
                raise TemplateError(f"message {i}: only assistant messages carry tool_calls")
            msg["tool_calls"] = [_tool_call(i, j, call) for j, call in enumerate(calls)]
        for key in ("tool_call_id", "name"):
            if msg.get(key) is not None and not isinstance(msg[key], str):
                raise TemplateError(f"message {i} {key} must be a string")
        out.append(msg)
    return out


def normalize_tools(tools: Any) -> list[dict[str, Any]] | None:
    """OpenAI tools in the one shape every template gets (llama-server's too): type, then function's
    name, description ("" when absent) and parameters ({} when absent). None or [] is no tools."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise TemplateError("tools must be a list")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise TemplateError(f"tools[{i}] needs a 'function' object")
        if tool.get("type", "function") != "function":
            raise TemplateError(f"tools[{i}]: only tools of type 'function' are supported")
        function = tool["function"]
        name, description = function.get("name"), function.get("description")
        parameters = function.get("parameters")
        if not isinstance(name, str) or not name:
            raise TemplateError(f"tools[{i}] needs a string function.name")
        if description is not None and not isinstance(description, str):
            raise TemplateError(f"tools[{i}] function.description must be a string")
        if parameters is not None and not isinstance(parameters, dict):
            raise TemplateError(f"tools[{i}] function.parameters must be a JSON schema object")
        out.append({"type": "function", "function": {
            "name": name, "description": description or "", "parameters": parameters or {}}})
    return out or None


# The generic tool format, for templates that know only system, user and assistant.
def _calls_as_text(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool calls become tagged text in the assistant's content; tool results become a user
    turn of <tool_response> blocks (consecutive results, and a user message right after them, share
    that turn, so templates that insist on alternating roles still render)."""
    out: list[dict[str, Any]] = []
    tool_turn: dict[str, Any] | None = None
    for m in msgs:
        role = m["role"]
        if role == "tool" or (role == "user" and tool_turn is not None):
            parts: Parts = (
                [("<tool_response>\n", False), (m["content"], True), ("\n</tool_response>", False)]
                if role == "tool" else [(m["content"], True)])
            if tool_turn is None:
                tool_turn = {"role": "user", "content": parts}
                out.append(tool_turn)
            else:
                tool_turn["content"] = tool_turn["content"] + [("\n", False)] + parts
            if role == "user":
                tool_turn = None
            continue
        tool_turn = None
        if role == "assistant" and m.get("tool_calls"):
            parts = [(m["content"], True)] if m["content"] else []
            for call in m["tool_calls"]:
                function = call["function"]
                text = json.dumps({"name": function["name"], "arguments": function["arguments"]},
                                  ensure_ascii=False)
                parts += [("\n" if parts else "", False), ("<tool_call>\n", False), (text, True),
                          ("\n</tool_call>", False)]
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = parts
        out.append(m)
    return out


def _tools_in_system(msgs: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tool schemas and the call format, merged into the system message (or a new one)."""
    block: Parts = [(_TOOLS_INTRO, False)]
    for tool in tools:
        block += [("\n", False), (json.dumps(tool["function"], ensure_ascii=False), True)]
    block.append((_TOOLS_CALL_FORMAT, False))
    if msgs and msgs[0]["role"] == "system":
        first = msgs[0]["content"]
        head: Parts = first if isinstance(first, list) else [(first, True)]
        return [{**msgs[0], "content": (head + [("\n\n", False)] if first else []) + block}, *msgs[1:]]
    return [{"role": "system", "content": block}, *msgs]


def _materialize(msgs: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                 mask: _Mask) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and tools as the template sees them, untrusted text behind `mask`'s placeholders."""
    out = []
    for m in msgs:
        msg = dict(m)
        content = m["content"]
        msg["content"] = mask.parts(content) if isinstance(content, list) else mask.content(content)
        if isinstance(m.get("reasoning_content"), str):
            msg["reasoning_content"] = mask.field(m["reasoning_content"])
        for key in ("name", "tool_call_id"):
            if key in m:
                msg[key] = mask.field(m[key])
        if "tool_calls" in m:
            msg["tool_calls"] = [
                {**call,
                 "function": {"name": mask.field(call["function"]["name"]),
                              "arguments": mask.values(call["function"]["arguments"])},
                 **({"id": mask.field(call["id"])} if "id" in call else {})}
                for call in m["tool_calls"]
            ]
        out.append(msg)
    if tools is None:
        return out, None
    masked_tools = [
        {"type": "function", "function": {
            "name": mask.field(t["function"]["name"]),
            "description": mask.field(t["function"]["description"]),
            "parameters": mask.descriptions(t["function"]["parameters"])}}
        for t in tools
    ]
    return out, masked_tools


class ChatTemplate:
    def __init__(self, source: str, *, name: str = "custom", bos_token: str = "", eos_token: str = "") -> None:
        self.name = name
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._warned = False
        env = _environment()
        try:
            self._template = env.from_string(source)
            self._supports_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template {name!r} does not compile: {exc}") from exc
        self._renders_tool_calls = "tool_calls" in source

    @property
    def supports_tools(self) -> bool:
        """The template reads the `tools` variable (its own tool prompt); otherwise render_segments puts
        the tools in the system message in the generic format."""
        return self._supports_tools

    @classmethod
    def builtin(cls, name: str, **tokens: str) -> ChatTemplate:
        key = _ALIASES.get(name.lower(), name.lower())
        if key not in BUILTIN_TEMPLATES:
            raise TemplateError(
                f"unknown chat template {name!r}; built-ins are: {', '.join(BUILTIN_TEMPLATES)}"
            )
        return cls(BUILTIN_TEMPLATES[key], name=key, **tokens)

    @classmethod
    def from_file(cls, path: str | Path, **tokens: str) -> ChatTemplate:
        try:
            source = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise TemplateError(f"cannot read chat template file {path}: {exc.strerror}") from exc
        return cls(source, name=str(path), **tokens)

    def render_segments(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                        tools: list[dict[str, Any]] | None = None, **extra: Any) -> list[Segment]:
        """The prompt as template text and content segments. `tools`: OpenAI tools; `extra` goes to the
        template as variables (enable_thinking, ...). Malformed messages or tools: TemplateError."""
        msgs = normalize_messages(messages)
        tool_list = normalize_tools(tools)
        if not self._renders_tool_calls:
            msgs = _calls_as_text(msgs)
        if tool_list is not None and not self._supports_tools:
            msgs, tool_list = _tools_in_system(msgs, tool_list), None

        def render(mask: _Mask) -> str:
            template_msgs, template_tools = _materialize(msgs, tool_list, mask)
            variables = extra if template_tools is None else {**extra, "tools": template_tools}
            token = _current_mask.set(mask if mask.level else None)
            try:
                return self._render(template_msgs, add_generation_prompt, variables)
            finally:
                _current_mask.reset(token)

        plain = render(_Mask(0))
        # Mask as much as the template allows: a masked render whose placeholders, put back, give exactly
        # the plain render proves the template only printed what it masked (it did not compare a tool
        # name, trim the content, ...). Level 2 masks the tool fields too, level 1 message content only.
        for level in (2, 1):
            mask = _Mask(level)
            try:
                segments = mask.split(render(mask))
            except TemplateError:
                segments = None
            if segments is not None and "".join(s.text for s in segments) == plain:
                return segments
            if level == 2 and segments is not None and not mask.fields:
                break  # nothing but content was masked: level 1 would render the same
        if not self._warned:
            # The template rewrites message content rather than printing it (rare): the prompt keeps the
            # template's exact text, and loses the injection guard.
            self._warned = True
            log.warning("chat template %s rewrites message content; special tokens in it are parsed", self.name)
        return [Segment(plain, False)] if plain else []

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, **extra: Any) -> str:
        return "".join(s.text for s in self.render_segments(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, **extra))

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, extra: dict) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template {self.name!r} failed: {exc}") from exc
        except Exception as exc:  # a template is code from a file; any failure is the template's
            raise TemplateError(f"chat template {self.name!r} failed: {type(exc).__name__}: {exc}") from exc

"""Request bodies of the OpenAI API, as far as we implement them.

Unknown fields are refused (400) rather than silently ignored: a client that sends
`functions` (OpenAI's predecessor of `tools`) must learn we do not read it.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from kubellm.runtime.core.sampling_params import SamplingParams
from kubellm.runtime.core.structured_output import GrammarSpec

MAX_N = 128  # choices per prompt: bounds what one request can ask of the engine


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def specs(self, prefix: str) -> list[tuple[str, GrammarSpec]]:
        """(request field, constraint) for each constraint given, fields named `prefix` +
        json / regex / choice / grammar."""
        makers = {
            "json": (self.json_, GrammarSpec.json_schema),
            "regex": (self.regex, lambda r: GrammarSpec("regex", r)),
            "choice": (self.choice, GrammarSpec.choice),
            "grammar": (self.grammar, lambda g: GrammarSpec("grammar", g)),
        }
        return [
            (prefix + name, make(value))
            for name, (value, make) in makers.items()
            if value is not None
        ]


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _RequestFields(BaseModel):
    """Both endpoints' fields but those SamplingParams takes as they are (added from its
    table by `_sampling_fields`)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string, as OpenAI) -> bias in [-100, 100]"
    )
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def grammar_spec(self) -> GrammarSpec | None:
        """The one output constraint the request names (ValueError for two)."""
        given = self._constraints()
        if len(given) > 1:
            names = ", ".join(field for field, _ in given)
            raise ValueError(f"give one output constraint, not several: {names}")
        return given[0][1] if given else None

    def constraint_field(self) -> str:
        """The top-level request field that carries the output constraint."""
        return self._constraints()[0][0].split(".")[0]

    def _constraints(self) -> list[tuple[str, GrammarSpec]]:
        guided = StructuredOutputs.model_validate(
            {
                "json": self.guided_json,
                "regex": self.guided_regex,
                "choice": self.guided_choice,
                "grammar": self.guided_grammar,
            }
        )
        out = self.structured_outputs or StructuredOutputs()
        return [*out.specs("structured_outputs."), *guided.specs("guided_")]

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        """`max_tokens` and `logprobs` as the endpoint resolved them (None: up to the
        context length; no logprobs), and the prompt's logprobs (completions' echo)."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        same = self.model_dump(include={f.name for f in _AS_THEY_ARE})
        return SamplingParams(
            **same,
            max_tokens=max_tokens,
            stop=stop,
            logprobs=logprobs,
            logit_bias=self._logit_bias(),
            prompt_logprobs=prompt_logprobs,
            structured_output=self.grammar_spec(),
        )

    def _logit_bias(self) -> dict[int, float]:
        try:
            return {int(token): bias for token, bias in (self.logit_bias or {}).items()}
        except ValueError:
            raise ValueError("logit_bias keys must be token ids") from None


# SamplingParams' fields a request takes under the same name and meaning (`rule`)
_AS_THEY_ARE = [f for f in dataclasses.fields(SamplingParams) if f.metadata["request"]]


def _sampling_fields() -> dict[str, Any]:
    """The request fields made from SamplingParams' table: the same name, type and
    default, the bounds in the schema's description (SamplingParams checks them, once).
    `n` is also bounded here: it is what one request can ask of the engine."""
    types = typing.get_type_hints(SamplingParams)
    made = {}
    for f in _AS_THEY_ARE:
        bounds = f.metadata["bounds"]
        described = {"description": None if bounds is None else bounds.describe()}
        if f.name == "n":
            described["le"] = MAX_N
        if f.default is dataclasses.MISSING:
            made[f.name] = (types[f.name], Field(default_factory=f.default_factory, **described))
        else:
            made[f.name] = (types[f.name], Field(f.default, **described))
    return made


_SamplingFields = create_model("_SamplingFields", __base__=_RequestFields, **_sampling_fields())


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str | list[int]] = Field(
        description="text, token ids, or a list of either (n choices per prompt, in order)"
    )
    logprobs: int | None = None
    echo: bool = Field(False, description="prefix each choice with its prompt (and its logprobs)")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        """One clear message instead of pydantic's one per union branch."""

        def one(p: Any) -> bool:
            return isinstance(p, str) or (isinstance(p, list) and all(type(t) is int for t in p))

        if not (one(prompt) or (isinstance(prompt, list) and all(one(p) for p in prompt))):
            raise ValueError("must be a string, a list of token ids, or a list of either")
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    """A message as OpenAI's clients send it: content as text or a list of text parts
    (None for an assistant turn that only called tools); `tool` messages carry a tool's
    result for `tool_call_id`; `developer` is OpenAI's newer name for `system`."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """One clear message for a part we cannot read (images, audio, files)."""
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(
                        f"content part type {kind!r} is not supported: this "
                        f"model reads text parts only"
                    )
        return content

    @model_validator(mode="after")
    def _complete(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(
                "content is required (it may be null only for an assistant message with tool_calls)"
            )
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def for_template(self, template_knows_developer: bool) -> dict[str, Any]:
        """The message as chat templates take it: text content, tool calls' arguments
        as objects; `developer` as `system` for templates that do not know it."""
        role = self.role
        if role == "developer" and not template_knows_developer:
            role = "system"
        text = self.content
        if isinstance(text, list):
            text = "".join(part.text for part in text)
        message: dict[str, Any] = {"role": role, "content": text or ""}
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _json_or_text(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        return message


def _json_or_text(arguments: str) -> Any:
    """Templates render a call's arguments from an object; keep text that is not JSON."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None

    def arguments_schema(self) -> dict[str, Any]:
        return self.parameters or {"type": "object"}


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto when tools are given, none otherwise (OpenAI's)"
    )
    parallel_tool_calls: bool = True

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_shape(cls, choice: Any) -> Any:
        """One clear message instead of pydantic's one per union branch."""
        if not isinstance(choice, dict) and choice not in (None, "none", "auto", "required"):
            raise ValueError(
                'must be "none", "auto", "required" or '
                '{"type": "function", "function": {"name": ...}}'
            )
        return choice

    def chosen_tool_use(self) -> str | NamedToolChoice:
        """`tool_choice` with OpenAI's default filled in."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def tool_calls_grammar(self) -> GrammarSpec | None:
        """`required` and a named function constrain the reply to calls, as vLLM does:
        a named function's arguments object, or a list of `{"name", "arguments"}`
        objects (one only without `parallel_tool_calls`)."""
        choice = self.chosen_tool_use()
        tools = {tool.function.name: tool.function for tool in self.tools or []}
        if isinstance(choice, NamedToolChoice):
            return GrammarSpec.json_schema(tools[choice.function.name].arguments_schema())
        if choice != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [name]},
                    "arguments": function.arguments_schema(),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, function in tools.items()
        ]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel_tool_calls:
            schema["maxItems"] = 1
        return GrammarSpec.json_schema(schema)

    def _constraints(self) -> list[tuple[str, GrammarSpec]]:
        given = super()._constraints()
        tool_calls = self.tool_calls_grammar()
        if tool_calls is not None:
            given = [("tool_choice", tool_calls), *given]
        response_format = self.response_format
        if response_format is None or response_format.type == "text":
            return given
        if response_format.type == "json_object":
            return [("response_format", GrammarSpec("json_object")), *given]
        if response_format.json_schema is None:
            raise ValueError("response_format of type json_schema needs its json_schema")
        schema = response_format.json_schema.schema_ or {"type": "object"}
        return [("response_format", GrammarSpec.json_schema(schema)), *given]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = None
    add_special_tokens: bool = True


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int

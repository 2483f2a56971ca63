"""The request fields that constrain an answer's text: OpenAI's ``response_format``, vLLM's
``structured_outputs`` and its older ``guided_*`` fields, mapped to the engine's
``StructuredOutputsParams``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pagedserve.entrypoints.openai.errors import bad_request
from pagedserve.sample.structured_output import check_grammar
from pagedserve.sampling_params import StructuredOutputsParams


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class JsonSchemaFormat(_Model):
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: str
    json_schema: JsonSchemaFormat | None = None
    # type "structural_tag" (vLLM's): see StructuredOutputsParams.structural_tag
    structures: list[Any] | None = None
    triggers: list[Any] | None = None
    format: Any = None


class StructuredOutputs(_Model):
    """vLLM's ``structured_outputs`` extra (one constraint of the output text)."""

    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    structural_tag: str | dict[str, Any] | None = None


LEGACY_GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
IGNORED_GUIDED_FIELDS = ("guided_decoding_backend", "guided_whitespace_pattern")


def legacy_guided_fields(data: Any) -> Any:
    """A request body with vLLM's ``guided_json``, ``guided_regex``, ``guided_choice`` or
    ``guided_grammar`` (its API before ``structured_outputs``) turned into the
    ``structured_outputs`` it means. vLLM 0.32 ignores them with a warning, and its clients get
    free text; older clients still send them."""
    if not isinstance(data, dict):
        return data
    given = {k: v for k, v in data.items() if k in LEGACY_GUIDED_FIELDS and v is not None}
    rest = {
        k: v
        for k, v in data.items()
        if k not in LEGACY_GUIDED_FIELDS and k not in IGNORED_GUIDED_FIELDS
    }
    if not given:
        return rest
    first = sorted(given)[0]
    if len(given) > 1 or data.get("structured_outputs") is not None:
        raise bad_request(
            "give one constraint: one of guided_json, guided_regex, guided_choice, "
            "guided_grammar, or structured_outputs",
            param=first,
        )
    return {**rest, "structured_outputs": {LEGACY_GUIDED_FIELDS[first]: given[first]}}


def structured_output_params(
    fmt: ResponseFormat | None, so: StructuredOutputs | None
) -> StructuredOutputsParams | None:
    """The constraint asked for by ``response_format`` (OpenAI) or ``structured_outputs``
    (vLLM); a 400 naming the field when its schema or regex is not valid."""
    kind = fmt.type if fmt else "text"
    param = "response_format" if kind != "text" else "structured_outputs"
    try:
        if kind == "json_object":
            params = StructuredOutputsParams(json_object=True)
        elif kind == "json_schema":
            assert fmt is not None
            if fmt.json_schema is None or fmt.json_schema.json_schema is None:
                raise ValueError("response_format of type json_schema needs json_schema.schema")
            params = StructuredOutputsParams(json=fmt.json_schema.json_schema)
        elif kind == "structural_tag":
            assert fmt is not None
            tag = fmt.model_dump(include={"structures", "triggers", "format"}, exclude_none=True)
            params = StructuredOutputsParams(structural_tag=tag)
        elif so is not None:
            params = StructuredOutputsParams(**so.model_dump(by_alias=True))
        else:
            return None
        check_grammar(params)
    except ValueError as exc:
        raise bad_request(str(exc), param=param) from exc
    return params


def refuse_unsupported_constraint(fmt: ResponseFormat | None, so: StructuredOutputs | None) -> None:
    """A 400 for a constraint the engine cannot honour yet (a client that asks for JSON must not
    be handed free text), or for two at once."""
    kind = fmt.type if fmt else "text"
    if kind not in ("text", "json_object", "json_schema", "structural_tag"):
        raise bad_request(
            f"response_format type {kind!r} is not supported; use 'text', 'json_object', "
            "'json_schema' or 'structural_tag'",
            param="response_format",
        )
    if so is None:
        return
    if kind != "text":
        raise bad_request(
            "give response_format or structured_outputs, not both",
            param="structured_outputs",
        )

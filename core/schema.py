"""Schemas for everything ctxc reads back from disk or the network (manifests, index metadata, batch records).

Metadata that comes from outside (an imported archive, an index folder someone handed over, a damaged file) is
validated against a strict pydantic model before any field is used: right types (no string where a number belongs,
no float where an integer belongs), closed choices, ranges, and no unknown keys. `validate()` turns the first
problem into one line naming the file, the field, the rule and the value.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from .errors import CtxcError

Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Hex32 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
# Free text that is shown to people (names, labels): no control characters, bounded length.
Label = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]*$", max_length=256)]


class Strict(BaseModel):
    """Strict types, no unknown keys, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Open(BaseModel):
    """Strict types; unknown keys are kept (records that may grow fields without a format change)."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


M = TypeVar("M", bound=BaseModel)


def problem(err: ValidationError) -> str:
    """The first error of a pydantic ValidationError as 'field.path: message (got VALUE)'."""
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e.get("loc", ())) or "(top level)"
    got = repr(e.get("input"))
    if len(got) > 60:
        got = got[:57] + "..."
    return f"{loc}: {e.get('msg', 'invalid').rstrip('.').lower()} (got {got})"


def validate(model: type[M], data: Any, what: str, fix: str, error: type[CtxcError] = CtxcError) -> M:
    """`model` validated from `data`, or `error(f"{what}: <field>: <problem>", fix)`."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise error(f"{what}: {problem(err)}", fix) from None

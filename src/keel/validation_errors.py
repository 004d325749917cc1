"""Pydantic's validation errors in words a user can act on: where (the path as they wrote it,
`models[0].timeout_s`) and what (pydantic's sentence, reworded to follow the path).

The one home of this wording. Three places report such errors, each in its own voice on top of
these pieces: a bad keel.yaml (`config.py`: a line per problem, with YAML hints), a bad request
body (`request_errors.py`: OpenAI's wording, the clearest problem) and a bad budget rule sent to
the admin API (`server/admin.py`: `describe`, as it is).
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Iterable, Mapping
from typing import Any, Union, get_args, get_origin

import orjson
from pydantic import BaseModel, ValidationError


def describe(exc: ValidationError, root: type[BaseModel]) -> str:
    """`where: what; where: what.` for pydantic's errors about a JSON object meant as a `root`."""
    problems = []
    for err in exc.errors(include_url=False):
        loc, kind = tuple(err["loc"]), err["type"]
        if kind == "extra_forbidden":
            what = unknown_key(loc, root)
        elif kind == "missing":
            what = f"required key '{loc[-1]}' is missing"
        else:
            what = reworded(str(err["msg"]))
            if kind != "value_error":
                what += f", got {shown(err['input'], as_json=True)}"
        problems.append(f"{path_text(loc, top='the body')}: {what}")
    text = "; ".join(problems)
    return text if text.endswith(("?", ".")) else text + "."


def reworded(msg: str) -> str:
    """Pydantic's sentence as what follows `where: ` (our own validators' words kept as they are)."""
    msg = msg.removeprefix("Value error, ")
    if msg.startswith("Input should"):
        msg = "should" + msg.removeprefix("Input should")
    return re.sub(r" or instance of \w+", "", msg)


def path_text(path: Iterable[str | int], *, top: str) -> str:
    """`models[0].deployments[1].model`; `top` when the path is empty."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or top


def shown(value: Any, *, as_json: bool, limit: int = 80) -> str:
    """A short rendering of the value the user sent: JSON for a request body, Python's repr
    (quotes as YAML users read them) otherwise; a long one is cut."""
    if as_json:
        try:
            text = orjson.dumps(value).decode()
        except TypeError:
            text = repr(value)
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unknown_key(
    loc: tuple[Any, ...], root: type[BaseModel], branches: Mapping[str, type[BaseModel]] | None = None
) -> str:
    """What to say about the key at the end of `loc` that `root` does not know: the key it most
    likely meant, else the keys allowed there."""
    key = str(loc[-1])
    valid = fields_at(loc[:-1], root, branches or {})
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key '{key}'; did you mean '{close[0]}'?"
    if valid:
        return f"unknown key '{key}'; valid keys here: {', '.join(valid)}"
    return f"unknown key '{key}' (check its spelling and indentation)"


def fields_at(
    loc: tuple[Any, ...], root: type[BaseModel], branches: Mapping[str, type[BaseModel]]
) -> list[str]:
    """The keys allowed at a location, following pydantic's raw location from `root`; `branches`
    names the union members pydantic may put in a location (a tag, or a model's name)."""
    current: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            continue
        if part in branches:
            current = branches[part]
            continue
        written = _written_names(current) if current is not None else {}
        if part not in written:
            return []
        current = _model_in(written[part].annotation)
    return list(_written_names(current)) if current is not None else []


def _written_names(model: type[BaseModel]) -> dict[str, Any]:
    """A model's fields by the key written in the file: its alias where it has one (`global`)."""
    return {field.alias or name: field for name, field in model.model_fields.items()}


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The one model inside `list[X]`, `X | None`, `Annotated[X, ...]`; None when ambiguous."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = get_origin(annotation)
    if origin is None:
        return None
    found = {m for arg in get_args(annotation) if (m := _model_in(arg)) is not None}
    if origin in (Union, types.UnionType) and len(found) > 1:
        return None
    return found.pop() if len(found) == 1 else None

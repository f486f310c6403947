"""The configuration reference (docs/configuration.md), generated from the config models (one source)."""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel

from danceopd.config import Config


def _type_name(ann) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:  # a constrained type (PlainName): its base type
        return _type_name(typing.get_args(ann)[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(ann))
    if origin in (list,):
        return f"list[{_type_name(typing.get_args(ann)[0])}]"
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return " \\| ".join(_type_name(a) for a in typing.get_args(ann))
    return getattr(ann, "__name__", str(ann)).replace("NoneType", "null")


def _section(name: str, model: type[BaseModel], title: str | None = None) -> list[str]:
    lines = [title or f"**`{name}`**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        lines.append(f"| `{key}` | {_type_name(ann)} | `{default}` | {field.description or ''} |")
    return lines + [""]


def _models(ann) -> list[type[BaseModel]]:
    """The config models of a union annotation (a per-backend section), else []."""
    args = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else ()
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def render() -> str:
    out = []
    for key, field in Config.model_fields.items():
        ann = field.annotation
        for model in _models(ann):  # one table per family, titled by its `name`
            tag = model.model_fields["name"].default
            default = ", the default" if model is field.default_factory else ""
            out += _section(key, model, f"**`{key}`** (`name: {tag}`{default})")
        inner = typing.get_args(ann)[0] if typing.get_origin(ann) is list else ann
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            label = f"{key}[]" if typing.get_origin(ann) is list else key
            out += _section(label, inner)
            for sub_key, sub in inner.model_fields.items():
                sub_ann = sub.annotation
                sub_inner = typing.get_args(sub_ann)[0] if typing.get_origin(sub_ann) is list else sub_ann
                if isinstance(sub_inner, type) and issubclass(sub_inner, BaseModel):
                    label2 = f"{label}.{sub_key}[]" if typing.get_origin(sub_ann) is list else f"{label}.{sub_key}"
                    out += _section(label2, sub_inner)
    return "\n".join(out)


DOC = "docs/configuration.md"  # the file that holds the generated block, relative to the repository root


def write_reference(path) -> None:
    """Replace the block between the config-reference markers of `path` (docs/configuration.md)."""
    import re
    from pathlib import Path

    path = Path(path)
    text = path.read_text()
    block = "<!-- config-reference:start -->\n" + render().strip() + "\n<!-- config-reference:end -->"
    path.write_text(re.sub(r"<!-- config-reference:start -->.*?<!-- config-reference:end -->", lambda _: block, text, flags=re.S))


if __name__ == "__main__":
    import sys

    if "--write" in sys.argv:
        write_reference(DOC)
    else:
        sys.stdout.write(render())

"""What the settings dataclasses (``NetworkConfig``, ``RefineConfig``, ``ZartConfig``) share.

Their defaults are the pipeline's defaults: ``workflow/schemas/config.schema.yaml`` documents
the same values and a test holds the two equal, so a library user and a pipeline user get the
same numbers. Enumerated settings are typed ``Literal[...]`` and checked once, when the object is
made (:func:`check_choices`); each class builds itself from its config section with
``from_config``, which refuses keys it does not know.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Any, TypeVar

T = TypeVar("T")


def literal_choices(annotation: Any) -> tuple[Any, ...]:
    """Return the values of a ``Literal[...]`` annotation, ``()`` for any other annotation."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return ()


def check_choices(instance: Any) -> None:
    """Check the ``Literal`` fields of the dataclass ``instance``.

    Raise ``ValueError`` naming the setting and its allowed values when such a field holds another
    value.
    """
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        choices = literal_choices(hints[f.name])
        value = getattr(instance, f.name)
        if choices and value not in choices:
            raise ValueError(f"{type(instance).__name__}.{f.name} = {value!r}; use one of {list(choices)}")


def from_section(
    cls: type[T], section: Mapping[str, Any], *, ignore: AbstractSet[str] = frozenset(), **extra: Any
) -> T:
    """Build ``cls(**section, **extra)`` without the workflow-only keys ``ignore``.

    A key ``cls`` does not know is a ``ValueError`` that names it (a typo must not fall back to a
    default).
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in section.items() if k not in ignore}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings {unknown}; known: {sorted(names)}")
    return cls(**values, **extra)

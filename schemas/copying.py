"""Deep copies of domain models that do not copy what cannot change.

The engine deep-copies states and runs so that no rule can reach the stored originals.
pydantic's deep copy hands every field to ``copy.deepcopy``, which rebuilds each UUID and
datetime through ``__reduce_ex__``: for a state that was the dearest single item of a
transition's CPU. Strings, numbers, UUIDs, datetimes and enums are immutable, so a copy may
share them; containers and nested models are still copied deeply.
"""

from __future__ import annotations

import copy
import datetime as dt
import enum
import uuid
from typing import Any, Self

from pydantic import BaseModel

__all__ = ["FastDeepCopy"]

_IMMUTABLE = (str, int, float, bool, type(None), uuid.UUID, dt.datetime, dt.date, enum.Enum)


class FastDeepCopy(BaseModel):
    """``model_copy(deep=True)`` and ``copy.deepcopy`` share immutable field values."""

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Self:
        memo = {} if memo is None else memo
        cls = type(self)
        clone = cls.__new__(cls)
        memo[id(self)] = clone
        fields = {
            key: value if isinstance(value, _IMMUTABLE) else copy.deepcopy(value, memo)
            for key, value in self.__dict__.items()
        }
        object.__setattr__(clone, "__dict__", fields)
        object.__setattr__(
            clone, "__pydantic_extra__", copy.deepcopy(self.__pydantic_extra__, memo)
        )
        object.__setattr__(clone, "__pydantic_fields_set__", set(self.__pydantic_fields_set__))
        private = getattr(self, "__pydantic_private__", None)
        object.__setattr__(clone, "__pydantic_private__", copy.deepcopy(private, memo))
        return clone

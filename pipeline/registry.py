"""One registry type for every plug-in family (criteria, tasks, architectures, evaluation methods,
predictor kinds): a name -> item map, filled where each item is defined, with one lookup that names the
family, the parameter the name came from and the names it knows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from pipeline.errors import UserError

T = TypeVar("T")


class UnknownName(KeyError, UserError):
    """A name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, what: str, error: type[Exception] = UnknownName):
        self.what, self._error, self._items = what, error, {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str, param: str | None = None) -> T:
        """The item called `name`; unknown: "unknown <what> 'x' (params: <param>); known: a, b"."""
        if name not in self._items:
            where = f" (params: {param})" if param else ""
            raise self._error(f"unknown {self.what} {name!r}{where}; known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

"""What ``models list`` shows of the cache: one :class:`ModelInfo` per model name (behind
:meth:`ModelCache.list_models`)."""

from __future__ import annotations

from dataclasses import dataclass

from edge_runtime.cache.layout import CacheLayout
from edge_runtime.cache.state import StateStore
from edge_runtime.errors import CacheError

__all__ = ["ModelInfo", "list_models"]


@dataclass(frozen=True)
class ModelInfo:
    """One model name as ``models list`` shows it; ``problems`` names broken links."""

    name: str
    versions: tuple[int, ...]
    active: int | None
    previous: int | None
    floor: int
    pinned: int | None
    problems: tuple[str, ...] = ()


def list_models(layout: CacheLayout, state: StateStore) -> list[ModelInfo]:
    """One record per model name; corrupt links are reported in ``problems``, not raised.

    Raises CacheError: the state file is corrupt.
    """
    loaded, infos = state.load(), []
    for name in layout.names():
        links: dict[str, int | None] = {"active": None, "previous": None}
        problems = []
        for which in links:
            try:
                links[which] = layout.link_version(name, which)
            except CacheError as e:
                problems.append(e.one_line())
        versions = tuple(layout.versions(name))
        floor = max(loaded.model(name).highest, *versions, 0)
        pinned = loaded.model(name).pinned
        infos.append(ModelInfo(name, versions, links["active"], links["previous"], floor, pinned, tuple(problems)))
    return infos

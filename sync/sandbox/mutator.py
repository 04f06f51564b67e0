"""Data changes timed by the requests a company receives: offsets shift under a paging client."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from sync.sandbox.data import SandboxData

__all__ = ["Mutator"]


@dataclass(slots=True)
class _MutationPlan:
    every: int
    updates: int
    inserts: int
    deletes: int
    seen: int = 0


class Mutator:
    """Changes a company's rows before every `every`-th page it serves: offsets shift mid-pass."""

    def __init__(self, data: SandboxData) -> None:
        self._data = data
        self._lock = threading.Lock()
        self._plans: dict[str, _MutationPlan] = {}

    def start(
        self, company: str, every: int = 1, updates: int = 1, inserts: int = 0, deletes: int = 0
    ) -> None:
        if every < 1 or min(updates, inserts, deletes) < 0:
            raise ValueError("every must be >= 1 and the counts >= 0")
        with self._lock:
            self._plans[company] = _MutationPlan(every, updates, inserts, deletes)

    def stop(self, company: str | None = None) -> None:
        with self._lock:
            if company is None:
                self._plans.clear()
            else:
                self._plans.pop(company, None)

    def before_page(self, company: str) -> None:
        """Called for each valid page request; the lock keeps the sequence deterministic."""
        with self._lock:
            plan = self._plans.get(company)
            if plan is None:
                return
            plan.seen += 1
            if plan.seen % plan.every:
                return
            if plan.deletes:
                self._data.delete(company, count=plan.deletes)
            if plan.updates:
                self._data.update(company, count=plan.updates)
            if plan.inserts:
                self._data.insert(company, count=plan.inserts)

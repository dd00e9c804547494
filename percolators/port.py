"""The percolator port: store rules, then ask which rules match each document of a batch.

Two implementations honour this contract and share one contract test suite
(``tests/percolators/test_contract.py``):

* ``percolators.embedded.EmbeddedPercolator``: in-process, the default and the fast path;
* ``percolators.elasticsearch.ElasticsearchPercolator``: an Elasticsearch 8/9 index with a
  ``percolator`` field.

Choose one from a URL with ``percolators.factory.create_percolator(settings)``.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Rule:
    """A rule to store: ``query`` is an Elasticsearch query DSL object.

    ``metadata`` is free-form string data stored with the rule (advertiser, audience, version,
    status); the Elasticsearch backend indexes it as keyword fields next to the query.
    """

    id: str
    query: Mapping[str, Any]
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RuleReport:
    """What validation learned about an accepted rule. ``warnings`` name costs, e.g. a rule that
    defeats candidate selection and is therefore checked against every document."""

    rule_id: str
    warnings: tuple[str, ...] = ()


@dataclass
class Explanation:
    """Why a document did or did not match, clause by clause.

    ``path`` is the clause path (``bool.must[0].term``), ``matched`` the clause's verdict,
    ``reason`` a human sentence (``age 31 is within [26, 35]``) and ``children`` the sub-clauses.
    """

    path: str
    query_type: str
    matched: bool
    reason: str
    children: list[Explanation] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "type": self.query_type,
            "matched": self.matched,
            "reason": self.reason,
        }
        if self.children:
            out["children"] = [child.to_dict() for child in self.children]
        return out


class Percolator(abc.ABC):
    """Stores rules and percolates documents against them.

    Contract:

    * Rules are validated against the document mapping given at construction. An invalid rule
      (unmapped field, ``script``, unknown query type, malformed clause) raises
      :class:`~percolators.errors.InvalidRuleError` naming the rule id and clause path.
    * :meth:`upsert` and :meth:`delete` take effect for every later :meth:`percolate` call; no
      rebuild is needed. Upserting an existing id replaces it. Deleting an unknown id is a no-op.
    * :meth:`percolate` returns, for each input document in order, the sorted list of ids of
      matching rules: exactly what Elasticsearch returns for the same mapping, rule and document.
      ``rule_ids`` restricts matching to those rules (unknown ids are ignored). ``now`` pins the
      time used by date math (default: the current time).
    * A document that cannot be indexed (Elasticsearch would reject it) raises
      :class:`~percolators.errors.InvalidDocumentError` from :meth:`percolate` naming the field,
      unless ``on_error="skip"`` in which case its slot holds the error instead of a list.
    * A backend that cannot be reached raises
      :class:`~percolators.errors.PercolatorUnavailableError` after its retries; nothing is lost:
      the caller retries the same batch.
    """

    @abc.abstractmethod
    def validate(self, rule: Rule) -> RuleReport:
        """Check a rule without storing it. Raises InvalidRuleError."""

    @abc.abstractmethod
    def upsert(self, rules: Iterable[Rule]) -> list[RuleReport]:
        """Add or replace rules. All are validated first: if one is invalid, none is stored."""

    @abc.abstractmethod
    def delete(self, rule_ids: Iterable[str]) -> None:
        """Remove rules by id."""

    @abc.abstractmethod
    def rule_ids(self) -> set[str]:
        """The ids of every stored rule."""

    @abc.abstractmethod
    def percolate(
        self,
        documents: Sequence[Mapping[str, Any]],
        *,
        rule_ids: Collection[str] | None = None,
        now: datetime | None = None,
        on_error: str = "raise",
    ) -> list[list[str] | Exception]:
        """For each document, the sorted ids of matching rules (see the class contract)."""

    @abc.abstractmethod
    def explain(
        self, query: Mapping[str, Any], document: Mapping[str, Any], *, now: datetime | None = None
    ) -> Explanation:
        """Clause-by-clause account of whether ``document`` matches ``query`` (nothing stored)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or files. The default does nothing."""

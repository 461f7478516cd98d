"""The curation funnel: how many records and questions each step took in and let through, and why
it dropped the rest.

Every step checks that it lost nothing silently (`kept + dropped == taken in`, and its per-reason
counts sum to its drops), so the funnel always adds up from the input to what is kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.table import Table

from potstill.curate.filters import question_id


def count_questions(records: Sequence[dict]) -> int:
    return len({question_id(r) for r in records})


@dataclass
class FunnelStep:
    name: str
    records_in: int
    records_out: int
    questions_in: int
    questions_out: int
    reasons: Counter[str] = field(default_factory=Counter)
    """Dropped records per drop_reason; sums to records_in - records_out."""
    notes: dict[str, int] = field(default_factory=dict)
    """Counts that are not record drops: questions removed whole, rewrite outcomes."""

    @property
    def dropped(self) -> int:
        return self.records_in - self.records_out

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "records_in": self.records_in,
            "records_out": self.records_out,
            "dropped": self.dropped,
            "questions_in": self.questions_in,
            "questions_out": self.questions_out,
            "reasons": dict(sorted(self.reasons.items())),
            "notes": dict(self.notes),
        }


@dataclass
class Funnel:
    input_records: int
    input_questions: int
    steps: list[FunnelStep] = field(default_factory=list)

    def add(
        self,
        name: str,
        taken: Sequence[dict],
        kept: Sequence[dict],
        dropped: Sequence[dict],
        *,
        questions_in: int | None = None,
        notes: dict[str, int] | None = None,
    ) -> FunnelStep:
        """Record one step. `questions_in` overrides the count of questions in `taken` (for a
        step that reports questions an earlier step emptied, like teacher_unsolved)."""
        if len(kept) + len(dropped) != len(taken):
            raise AssertionError(
                f"curate step '{name}' lost records: {len(taken)} in, {len(kept)} kept + "
                f"{len(dropped)} dropped"
            )
        reasons = Counter(r["drop_reason"] for r in dropped)
        step = FunnelStep(
            name=name,
            records_in=len(taken),
            records_out=len(kept),
            questions_in=count_questions(taken) if questions_in is None else questions_in,
            questions_out=count_questions(kept),
            reasons=reasons,
            notes=dict(notes or {}),
        )
        self.steps.append(step)
        return step

    @property
    def kept_records(self) -> int:
        return self.steps[-1].records_out if self.steps else self.input_records

    @property
    def kept_questions(self) -> int:
        return self.steps[-1].questions_out if self.steps else self.input_questions

    def reasons(self) -> Counter[str]:
        """Dropped records per reason over all steps."""
        total: Counter[str] = Counter()
        for step in self.steps:
            total.update(step.reasons)
        return total

    def to_dict(self) -> dict:
        reasons = self.reasons()
        return {
            "input": {"records": self.input_records, "questions": self.input_questions},
            "steps": [step.to_dict() for step in self.steps],
            "kept": {"records": self.kept_records, "questions": self.kept_questions},
            "dropped": {"records": sum(reasons.values()), "reasons": dict(sorted(reasons.items()))},
        }

    def table(self, title: str = "curation funnel") -> Table:
        """One row per step: records and questions in -> out, and the drop reasons."""
        table = Table(title=title)
        table.add_column("step", no_wrap=True)
        table.add_column("records", justify="right", no_wrap=True)
        table.add_column("dropped", justify="right")
        table.add_column("questions", justify="right", no_wrap=True)
        table.add_column("why", overflow="fold")
        table.add_row(
            "input", str(self.input_records), "", str(self.input_questions), "", style="bold"
        )
        for step in self.steps:
            why = [f"{reason} {n}" for reason, n in step.reasons.most_common()]
            why += [f"{note}: {n}" for note, n in step.notes.items()]
            table.add_row(
                step.name,
                f"{step.records_in} → {step.records_out}",
                str(step.dropped) if step.dropped else "",
                f"{step.questions_in} → {step.questions_out}",
                ", ".join(why),
            )
        share = self.kept_records / self.input_records if self.input_records else 0.0
        table.add_row(
            "kept",
            str(self.kept_records),
            f"{self.input_records - self.kept_records}",
            str(self.kept_questions),
            f"{share:.1%} of the input records",
            style="bold",
        )
        return table

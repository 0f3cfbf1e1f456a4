"""Per-step records and per-run statistics: what makes a run fast or slow.

Definitions (used by the trace, the CLI, the server and the benchmark alike):

* ``acceptance_rate`` = accepted drafted tokens / drafted tokens. A tree draft counts every
  candidate it sent to verification, of which at most one per depth can be accepted.
* ``mean_accepted_length`` = emitted tokens / target passes: tokens per target forward pass,
  **counting the target's own recovered or bonus token** (Spec-Bench's "mean accepted tokens"; plain
  decoding scores exactly 1.0). ``mean_accepted_drafts`` is the same without that token.
* ``acceptance_by_position[i]``: the chance that the drafted token at position i+1 is accepted
  given that the i before it were: of the steps that drafted at least i+1 tokens (a tree: reached
  depth i+1) and had their first i accepted, the fraction that accepted position i+1 too. The
  cost model's expected tokens per step, 1 + a1 + a1*a2 + ..., multiplies exactly these.
* time is split into drafting, verification (the target pass plus the acceptance rule) and
  overhead (everything else in the loop: detokenising, stop checks, bookkeeping); prefill is
  reported apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StepRecord:
    step: int
    draft_len: int  # tau the policy allowed
    drafted: int  # tokens the drafter proposed (<= draft_len)
    accepted: int  # accepted drafted tokens
    emitted: int  # tokens appended this step after stop conditions (accepted + 1 at most)
    draft_s: float
    verify_s: float
    overhead_s: float
    target_tokens: int  # this request's tokens in the pass (drafted + 1, or the prompt's last chunk)
    depth: int | None = None  # a tree's depth when the drafted tokens formed one (None: a chain)
    # prompt tokens read in the pass: the step whose pass finished reading the prompt and gave the
    # first token (its time is the prefill's, not verification); 0 for a decoding step
    prompt_tokens: int = 0

    @property
    def positions(self) -> int:
        """Draft positions this step tested: its chain's length or its tree's depth."""
        return self.drafted if self.depth is None else self.depth

    def to_json(self) -> dict:
        return {"type": "step", **asdict(self)}


@dataclass
class RunStats:
    drafter: str = ""
    policy: str = ""
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # target passes that emitted tokens (the first: the prompt's last chunk)
    drafted: int = 0
    accepted: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    overhead_s: float = 0.0
    total_s: float = 0.0
    drafted_at: list[int] = field(default_factory=list)  # steps that drafted >= i+1 tokens
    accepted_at: list[int] = field(default_factory=list)  # steps that accepted >= i+1 tokens
    reached_at: list[int] = field(default_factory=list)  # steps that drafted >= i+1 and accepted >= i

    def add(self, rec: StepRecord) -> None:
        self.steps += 1
        self.drafted += rec.drafted
        self.accepted += rec.accepted
        self.new_tokens += rec.emitted
        self.draft_s += rec.draft_s
        if not rec.prompt_tokens:  # a prompt chunk's pass is counted in ``prefill_s``
            self.verify_s += rec.verify_s
        self.overhead_s += rec.overhead_s
        tally_positions(self.drafted_at, self.reached_at, self.accepted_at, rec.positions, rec.accepted)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def mean_accepted_drafts(self) -> float:
        return self.accepted / self.steps if self.steps else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return rates_by_position(self.accepted_at, self.reached_at)

    @property
    def tokens_per_second(self) -> float:
        """New tokens over the whole call's wall time, prefill included (what a user waits for)."""
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        decode = self.total_s - self.prefill_s
        return self.new_tokens / decode if decode > 0 else 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        for name in (
            "acceptance_rate",
            "mean_accepted_length",
            "mean_accepted_drafts",
            "acceptance_by_position",
            "tokens_per_second",
            "decode_tokens_per_second",
        ):
            out[name] = getattr(self, name)
        return out


def decoding_steps(steps: list[dict]) -> list[dict]:
    """Traced steps (``StepRecord.to_json``) without the one whose pass read the prompt's end:
    that pass is prefill, not decoding."""
    return [s for s in steps if not s.get("prompt_tokens")]


def tally_positions(drafted_at: list[int], reached_at: list[int], accepted_at: list[int], positions: int,
                    accepted: int) -> None:
    """Count one step into per-position tallies: it drafted positions 1..``positions`` (a tree:
    its depth), reached (tested) position i+1 when its first i were accepted, and accepted the
    first ``accepted``."""
    for counts in (drafted_at, reached_at, accepted_at):
        counts.extend([0] * (positions - len(counts)))
    for i in range(positions):
        drafted_at[i] += 1
        reached_at[i] += int(i <= accepted)
        accepted_at[i] += int(i < accepted)


def rates_by_position(accepted_at: list[int], reached_at: list[int]) -> list[float]:
    """Acceptance at each draft position given the earlier ones were accepted (0 where never reached)."""
    return [a / r if r else 0.0 for a, r in zip(accepted_at, reached_at)]

"""Static memory planning: every buffer gets an offset in one arena, by lifetime.

Greedy by size, as TFLite Micro's planner: take buffers largest first and put each at the lowest offset where
it does not overlap (in bytes) any already placed buffer whose lifetime [first, last] overlaps its own.
Offsets are aligned to ALIGN bytes. `check_plan` is the independent overlap checker the tests use.
"""

from dataclasses import dataclass

ALIGN = 8


@dataclass(frozen=True)
class Buffer:
    name: str
    size: int
    first: int  # index of the step that writes it first
    last: int  # index of the step that reads it last


@dataclass
class ArenaPlan:
    offsets: dict[str, int]
    size: int
    buffers: list[Buffer]

    def live_at(self, step: int) -> list[Buffer]:
        return [b for b in self.buffers if b.first <= step <= b.last]

    def peak_step(self) -> int:
        """The step with the most live bytes (where a budget is decided)."""
        steps = range(min((b.first for b in self.buffers), default=0), max((b.last for b in self.buffers), default=0) + 1)
        return max(steps, key=lambda s: sum(b.size for b in self.live_at(s)), default=0)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_arena(buffers: list[Buffer]) -> ArenaPlan:
    offsets: dict[str, int] = {}
    placed: list[Buffer] = []
    for buf in sorted(buffers, key=lambda b: (-b.size, b.first, b.name)):
        busy = sorted((offsets[p.name], offsets[p.name] + _align(p.size)) for p in placed
                      if p.first <= buf.last and buf.first <= p.last)
        offset = 0
        for start, end in busy:
            if offset + _align(buf.size) <= start:
                break
            offset = max(offset, end)
        offsets[buf.name] = offset
        placed.append(buf)
    size = max((offsets[b.name] + _align(b.size) for b in buffers), default=0)
    return ArenaPlan(offsets, size, list(buffers))


def check_plan(plan: ArenaPlan) -> None:
    """Raise if two buffers that are alive at the same time share a byte, or one leaves the arena."""
    bufs = plan.buffers
    for i, a in enumerate(bufs):
        oa = plan.offsets[a.name]
        if oa % ALIGN or oa < 0 or oa + a.size > plan.size:
            raise AssertionError(f"{a.name} at {oa}+{a.size} is misaligned or outside the {plan.size}-byte arena")
        for b in bufs[i + 1:]:
            ob = plan.offsets[b.name]
            if a.first <= b.last and b.first <= a.last and oa < ob + b.size and ob < oa + a.size:
                raise AssertionError(f"{a.name} [{oa}, {oa + a.size}) overlaps {b.name} [{ob}, {ob + b.size}) "
                                     "while both are alive")

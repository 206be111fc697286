"""The seeds an exploration runs, as a MAILFLOW_*_SEEDS variable names them: `1-300`, `1,5,9`, or both mixed
(`1-3,7`); blanks around a part and empty parts are passed over."""
from __future__ import annotations


def seed_list(spec: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        low, _, high = part.partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return out

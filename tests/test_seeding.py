"""The one table of random stream purposes (`lossfloor.seeding.Stream`)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import numpy as np

from lossfloor.seeding import Stream, derived_seed

SRC = Path(__file__).resolve().parents[1] / "src" / "lossfloor"
SEEDING_FUNCTIONS = {"derived_seed", "generator_for"}
#: Ids given in both domains before the table existed (training: model, data order, σ, ε;
#: estimate: sources, outer ε, inner sets, tilt); kept so that every number stays the same.
SHARED_BEFORE_THE_TABLE = {0, 1, 2, 3}


def test_stream_purposes_are_distinct_within_each_domain():
    by_domain: dict[str, list[int]] = defaultdict(list)
    for stream in Stream:
        by_domain[stream.domain].append(int(stream))
    assert set(by_domain) == {"estimate", "training"}
    for domain, ids in by_domain.items():
        assert len(ids) == len(set(ids)), f"two {domain} streams share an id: {sorted(ids)}"


def test_no_stream_is_an_alias_of_another():
    # Enum silently makes a member with an existing value an alias of the first.
    assert len(Stream.__members__) == len(list(Stream))


def test_a_new_stream_takes_an_id_no_domain_uses():
    estimate = {int(s) for s in Stream if s.domain == "estimate"}
    training = {int(s) for s in Stream if s.domain == "training"}
    assert estimate & training == SHARED_BEFORE_THE_TABLE


def test_the_purposes_keep_their_values():
    # The seeds of every committed result and run: changing one changes every number.
    assert {s.name: int(s) for s in Stream} == {
        "SOURCES": 0,
        "OUTER_NOISE": 1,
        "INNER": 2,
        "TILT": 3,
        "FLOOR_SUBSETS": 10,
        "FLOOR_VALIDATION": 11,
        "COMPONENT": 12,
        "MODEL": 0,
        "DATA_ORDER": 1,
        "SIGMA": 2,
        "NOISE": 3,
        "UNCERTAINTY": 4,
        "LATENT": 13,
    }


def test_derived_seed_is_seedsequence_of_seed_purpose_and_keys():
    state = np.random.SeedSequence([7, 1, 5]).generate_state(2, np.uint32)
    assert derived_seed(7, Stream.OUTER_NOISE, 5) == int(state.view(np.uint64)[0]) >> 1


def _purpose_calls() -> list[tuple[str, int, ast.expr | None]]:
    """(file, line, purpose argument) of every call of a seeding function in src/lossfloor."""
    calls = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "seeding.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = getattr(f, "id", getattr(f, "attr", ""))
            if name in SEEDING_FUNCTIONS:
                purpose = node.args[1] if len(node.args) > 1 else None
                calls.append((str(path.relative_to(SRC)), node.lineno, purpose))
    return calls


def test_every_call_names_its_stream_purpose():
    calls = _purpose_calls()
    assert len(calls) >= 10  # the scan finds the calls (outer, estimate, floor, training)
    for file, line, purpose in calls:
        assert purpose is not None, f"{file}:{line}: a seeding call without a purpose"
        assert not isinstance(purpose, ast.Constant | ast.Starred), (
            f"{file}:{line}: the purpose is a literal or unpacked; name it Stream.X"
        )
        # Stream.X, or a parameter typed Stream (floor's _losses takes the stream it draws ε from)
        member = isinstance(purpose, ast.Attribute) and ast.unparse(purpose.value) == "Stream"
        assert member or isinstance(purpose, ast.Name), (
            f"{file}:{line}: the purpose is not a Stream member"
        )

"""The round's decision (worker.outer_round.decide), case by case: no processes, no network.

Each row is what the phases found so far and what the round must do: end with an outcome, or
(None) run its next phase.
"""

from __future__ import annotations

import pytest

from worker.outer_round import Outcome, RoundFacts, decide

OK = {"finite": True, "agrees": True}

CASES = [
    # (why, facts, outcome)
    ("nothing known yet: compute the pseudo-gradient", RoundFacts(), None),
    ("a diverged local model never reaches theta_g", RoundFacts(finite=False), Outcome.DROPPED),
    ("dropped wins over a stop", RoundFacts(finite=False, stop_requested=True), Outcome.DROPPED),
    ("finite: check agreement next", RoundFacts(finite=True), None),
    ("theta_g disagrees with the swarm: repair, apply nothing", RoundFacts(finite=True, agrees=False),
     Outcome.DESYNC),
    ("in sync: wait for the members and average", RoundFacts(**OK), None),
    ("stopped before any group: leave the round unfinished", RoundFacts(**OK, stop_requested=True),
     Outcome.STOPPED),
    ("a group of 3 averaged", RoundFacts(**OK, group_size=3), Outcome.AVERAGED),
    ("a group that averaged is applied even when a stop came meanwhile",
     RoundFacts(**OK, group_size=2, stop_requested=True), Outcome.AVERAGED),
    ("alone: is the swarm ahead?", RoundFacts(**OK, group_size=1), None),
    ("no group, the swarm is not ahead: does anyone still hold this theta_g?",
     RoundFacts(**OK, group_size=1, swarm_ahead=False), None),
    ("nobody else holds this theta_g: DiLoCo with M=1",
     RoundFacts(**OK, group_size=1, swarm_ahead=False, partners=0, may_extend=True), Outcome.ALONE),
    ("alone, not overtaken, stopping: the lone update is this epoch's, apply it",
     RoundFacts(**OK, group_size=1, swarm_ahead=False, partners=0, stop_requested=True), Outcome.ALONE),
    ("no group while peers hold this theta_g: train on rather than fork the swarm",
     RoundFacts(**OK, group_size=1, swarm_ahead=False, partners=2, may_extend=True), Outcome.EXTENDED),
    ("no group while peers hold this theta_g, and stopping: unfinished (the restart redoes the outer step)",
     RoundFacts(**OK, group_size=1, swarm_ahead=False, partners=2, may_extend=True, stop_requested=True),
     Outcome.STOPPED),
    ("extended as often as allowed: the swarm must still move, step alone (the fork choice heals it)",
     RoundFacts(**OK, group_size=1, swarm_ahead=False, partners=2, may_extend=False), Outcome.ALONE),
    ("alone while the swarm moved on: try to take its state",
     RoundFacts(**OK, group_size=1, swarm_ahead=True), None),
    ("overtaken and stopping before the fetch: unfinished rather than diverge",
     RoundFacts(**OK, group_size=1, swarm_ahead=True, stop_requested=True), Outcome.STOPPED),
    ("took the swarm's state", RoundFacts(**OK, group_size=1, swarm_ahead=True, took_swarm_state=True),
     Outcome.OVERTAKEN),
    ("the swarm's state could not be had in time: train on and fetch it next round, not fork",
     RoundFacts(**OK, group_size=1, swarm_ahead=True, took_swarm_state=False, may_extend=True),
     Outcome.EXTENDED),
    ("could not take it, extended as often as allowed: go on alone rather than stall",
     RoundFacts(**OK, group_size=1, swarm_ahead=True, took_swarm_state=False), Outcome.ALONE),
    ("could not take it and stopping: unfinished",
     RoundFacts(**OK, group_size=1, swarm_ahead=True, took_swarm_state=False, stop_requested=True),
     Outcome.STOPPED),
]


@pytest.mark.parametrize(("why", "facts", "outcome"), CASES, ids=[c[0] for c in CASES])
def test_decide(why: str, facts: RoundFacts, outcome: Outcome | None) -> None:
    assert decide(facts) is outcome, why


def test_every_outcome_is_reachable() -> None:
    assert {c[2] for c in CASES} - {None} == set(Outcome)

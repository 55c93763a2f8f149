"""Questions offered functions that do not fit them: the right reply is the no-call answer.

Two kinds of pairing, both from a list of BFCL questions: *far* (the functions of the question half
the list away, so in a list ordered by category another category's) and *near misses* (the other
question's functions that read closest to the question and still do not fit, like the plausible
wrong tools of BFCL's irrelevance category). The self-improvement benchmark trains on such pairs
(abstention goals).
"""

from __future__ import annotations

import numpy as np

from selftune.bfcl.data import BfclQuestion
from selftune.memory.embeddings import DEFAULT_EMBEDDING_MODEL, LocalSentenceTransformerEmbedding

__all__ = ["NEAR_MISS_MAX_SIMILARITY", "functions_text", "mismatched", "near_miss_partners"]

NEAR_MISS_MAX_SIMILARITY = 0.6  # a near-miss partner's functions stay below this cosine to the question's own


def functions_text(question: BfclQuestion) -> str:
    """The offered functions' names and descriptions, as the near-miss pairing embeds them."""
    return "; ".join(f"{f['name']}: {f.get('description', '')}" for f in question.functions)


def near_miss_partners(questions: list[BfclQuestion], embedding_model: str) -> list[int]:
    """For each question, the other question whose functions read closest to it (embedding cosine of the
    question to the functions' names and descriptions), skipping functions that share a name with the
    question's own or read like them (cosine at least :data:`NEAR_MISS_MAX_SIMILARITY`): they might fit."""
    embed = LocalSentenceTransformerEmbedding(embedding_model)
    asks = np.array(embed([q.messages[-1].content for q in questions]))
    offers = np.array(embed([functions_text(q) for q in questions]))
    to_question, to_functions = asks @ offers.T, offers @ offers.T
    partners = []
    for index, question in enumerate(questions):
        names = {f["name"] for f in question.functions}
        partners.append(next(
            (int(other) for other in np.argsort(-to_question[index], kind="stable")
             if other != index and to_functions[index, other] < NEAR_MISS_MAX_SIMILARITY
             and names.isdisjoint(f["name"] for f in questions[other].functions)),
            (index + len(questions) // 2) % len(questions)))  # none qualifies: the far partner
    return partners


def mismatched(questions: list[BfclQuestion], count: int, near_miss: int,
               embedding_model: str = DEFAULT_EMBEDDING_MODEL) -> list[tuple[BfclQuestion, None]]:
    """``count`` far and ``near_miss`` near-miss pairings of ``questions`` with functions that do not fit."""
    if len(questions) < 2:
        return []

    def spread(indices: list[int], wanted: int) -> list[int]:
        return indices[::max(1, len(indices) // wanted)][:wanted] if wanted > 0 else []

    def goal(index: int, other: int, suffix: str) -> tuple[BfclQuestion, None]:
        question = questions[index]
        return question.model_copy(update={
            "id": f"{question.id}~{suffix}", "category": "irrelevance",
            "functions": questions[other].functions}), None

    half = len(questions) // 2
    far = spread(list(range(len(questions))), count)
    goals = [goal(index, (index + half) % len(questions), "none") for index in far]
    taken = set(far)
    near = spread([index for index in range(len(questions)) if index not in taken], near_miss)
    if near:
        partners = near_miss_partners(questions, embedding_model)
        goals += [goal(index, partners[index], "near") for index in near]
    return goals

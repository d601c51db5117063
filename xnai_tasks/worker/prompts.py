"""The fixed instructions each LLM role task's prompt starts with, before anything a request varies.

A prompt is ``preamble``, then the request's notes or facts, then its question (:func:`~xnai_tasks.models.
inference.compose_prompt`). Every prompt of one template therefore begins with the same tokens, which a
process's prompt cache (:mod:`xnai_tasks.models.prompt_cache`) evaluates once. The default LLM is a small
base model: the instructions describe the text that follows rather than give orders it was never tuned to
follow, and show no worked example (it copied the example's sentences into its answers).
"""

from __future__ import annotations

#: cline.generate_docs: a documentation entry, from notes when there are notes.
DOCS = (
    "Developer documentation of xnai-tasks, a task queue for a team of local AI agents built on Celery and "
    "Redis: roles, queues, signed messages, models and workers. Each entry below answers one question in one "
    "short, plain paragraph for a developer. When notes come before a question, the answer restates what the "
    "notes say about it, in its own words, and says so when they do not cover it; it never invents names, "
    "numbers or commands."
)

#: cline.generate_code: a code file of snippets, each under the comment that asks for it.
CODE = (
    "# Snippets from the xnai-tasks developer handbook. Each one is short, complete and self-contained:\n"
    "# it does what the comment above it asks, uses only the language's standard library, and its code\n"
    "# block ends right after the code."
)

#: grok.synthesize: a long-form answer, from notes when there are notes.
SYNTHESIS = (
    "Answers by the analyst of xnai-tasks, a task queue for a team of local AI agents. Each answer below "
    "is a clear, well organised explanation of a few paragraphs for an engineer. When notes come before a "
    "question, the answer is built only from those notes and says plainly what they do not cover."
)

#: grok.analyze: one option's advantage and disadvantage, from its facts only.
ANALYSIS = (
    "Trade-off assessments by the analyst of xnai-tasks, a task queue for a team of local AI agents. Each "
    "assessment below weighs one option for the question asked: one advantage and one disadvantage, each in "
    "one short sentence taken only from the facts given just before it. Nothing beyond those facts is added."
)

#: Every template by name (the bench measures them side by side).
TEMPLATES = {"docs": DOCS, "code": CODE, "synthesis": SYNTHESIS, "analysis": ANALYSIS}

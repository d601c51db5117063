"""The workflows ``xnai run`` and ``Client.run`` know, by name: the built-in ones."""

from __future__ import annotations

from xnai_tasks.errors import UnknownWorkflowError
from xnai_tasks.workflow import builtin
from xnai_tasks.workflow.spec import Workflow

WORKFLOWS: dict[str, Workflow] = {
    flow.name: flow
    for flow in (
        Workflow("research", builtin.research),
        Workflow("code", builtin.code),
        Workflow("review", builtin.review),
    )
}


def get_workflow(name: str) -> Workflow:
    """The workflow ``name``; UnknownWorkflowError naming the known ones."""
    if name not in WORKFLOWS:
        raise UnknownWorkflowError(f"unknown workflow {name!r} (workflows: {', '.join(workflow_names())})")
    return WORKFLOWS[name]


def workflow_names() -> list[str]:
    """Every known workflow's name."""
    return sorted(WORKFLOWS)

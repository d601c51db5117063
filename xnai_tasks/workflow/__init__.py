"""Workflows: steps on the role workers, run and decided on by the copilot (README, Workflows).

A workflow is a Python function of a :class:`~xnai_tasks.workflow.run.Run` and its keyword arguments; it
calls ``run.step`` (one signed task on a role's queue, with a timeout) and ``run.parallel`` (several at
once), and decides from their results what comes next. Cross-role hand-offs all go through the copilot:
a role cannot push to another role's queue (security/acl.py). The known workflows are in ``catalogue``.
"""

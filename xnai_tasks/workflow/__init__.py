"""Workflows: steps on the role workers, run and decided on by the copilot (README, Workflows).

A workflow is an ``async def`` of a run (:class:`~xnai_tasks.workflow.ledger.Steps`) and its keyword arguments; it
awaits ``run.step`` (one signed task on a role's queue, with a timeout) and ``run.parallel`` (several at once), and
decides from their results what comes next. The sync :class:`~xnai_tasks.workflow.run.Run` (``Client.run``, the
copilot worker) and the :class:`~xnai_tasks.workflow.async_run.AsyncRun` (``AsyncClient.run``) run the same
driver. Cross-role hand-offs all go through the copilot: a role cannot push to another role's queue
(security/acl.py). The known workflows are in ``catalogue``.
"""

"""One module per role; each registers that role's tasks on the xnai_tasks Celery app."""

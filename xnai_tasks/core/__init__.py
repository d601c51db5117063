"""The Celery app and what every part shares: fixed names (roles, queues, tasks, Redis keys), Redis connections,
state files.
"""

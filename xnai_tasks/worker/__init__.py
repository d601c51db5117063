"""A role worker: its start-up, the role task base and decorator, the cap on redeliveries, dead letters, health,
and what role tasks share.
"""

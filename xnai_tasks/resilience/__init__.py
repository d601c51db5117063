"""Surviving failures: of Redis, of a process, of the LLM.

* :mod:`.reconnect`: a worker gives back the messages it held when its broker connection dropped.
* :mod:`.outage`: a client's wait outlives a Redis restart.
* :mod:`.breaker`: one circuit breaker per role and model; state only in Redis, every transition one Lua script.
* :mod:`.pool`: a per-host cap on the processes of a role using a model at once (leases that expire).
* :mod:`.llm_guard`: the one place an LLM call passes the breaker and the pool (:func:`~.llm_guard.guarded`).
"""

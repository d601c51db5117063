"""Signatures, keys, the publish hook, the replay ledger, the signed result backend, the gate before the pool,
Redis ACLs and signed remote control.
"""

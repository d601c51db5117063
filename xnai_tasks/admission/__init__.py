"""Admission: each role's queue has a cap checked atomically with the push (load shedding at submit), and the
recent throughput of each role that tells a refused caller when to come back."""

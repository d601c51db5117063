"""The resource plan: how a host's CPUs, threads and RAM are split among the roles."""

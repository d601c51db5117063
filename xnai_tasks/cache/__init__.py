"""The response cache's semantic side: what a lookup compares (request), the guard's decision, its evaluation."""

"""Dynamic batching of the curation encoder: one-text tasks answered from shared encoder calls."""

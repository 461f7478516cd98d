"""The teacher's side: generation backends (and, later, the logit cache)."""

"""Training: one candidate at a time (:mod:`.trainer`) or a whole population batched."""

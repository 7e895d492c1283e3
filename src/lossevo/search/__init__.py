"""Loss-function searches. Each is generational with its state on disk (see :mod:`.state`)."""

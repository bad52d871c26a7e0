"""The generator service: a prompt becomes code through Claude (the Anthropic SDK), aware of the
user's secret names and the run's limits, and optionally runs through the executor."""

"""Training utilities for the scorers (``guidedecode train ...``): one module per method."""

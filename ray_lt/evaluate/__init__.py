"""Evaluation: ``predict`` (an exported classifier over a Ray Dataset on an actor pool),
``metrics`` (pure functions of labels and predictions, also used by the training loop),
``classifier`` (a split's metrics, predictions and plot), ``plots``, ``quality`` (the
synthetic data against the real) and ``report``. The package imports nothing itself, so the
training loop can use ``metrics`` without the layers above it."""

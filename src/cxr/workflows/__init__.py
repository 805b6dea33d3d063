"""One function per verb over a run folder: train, evaluate, calibrate and thresholds,
explain, localize, and the demo that chains them. The CLI calls these; they call the
engine, the model, the data layer and the explainers."""

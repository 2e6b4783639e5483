"""The method: VPPO's math, the shaping of a batch, perturbations, the measurement passes, batch rows, metrics, config
and trainer."""

"""The method: VPPO's math, perturbations, the measurement passes, batch rows, metrics, config and trainer."""

"""Tools around training: the token-perception spotlight, evaluation and the CPU demo."""

"""streamgen control plane."""

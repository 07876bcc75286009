"""Traffic: routers that switch backend sets atomically, drain, weight and count per release."""

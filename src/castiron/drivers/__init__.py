"""Runtime drivers: one small protocol per runtime; create, destroy, observe, inspect. No policy."""

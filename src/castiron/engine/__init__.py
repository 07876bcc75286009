"""The engine: the only place where spec meets runtime (plans, strategies, rollback, drift)."""

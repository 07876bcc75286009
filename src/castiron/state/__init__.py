"""State: images, releases, deployments, journal, instances, events, locks and the audit chain."""

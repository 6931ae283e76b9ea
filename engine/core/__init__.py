"""What every part of the engine shares: errors, names, the registry, events, file helpers, settings, locks."""

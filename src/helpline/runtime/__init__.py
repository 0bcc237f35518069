"""The running services under the rules: Core (engines, bus, caches, wake-ups), live events, metrics
counters, logs and the garbage-collection policy. Imports config and store only."""

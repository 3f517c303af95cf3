"""The bundled run configs (YAML deltas onto the defaults in mixtail.trainer.config)."""

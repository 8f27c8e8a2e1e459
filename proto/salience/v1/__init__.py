"""Generated stubs of `salience/v1/salience.proto` (regenerate with scripts/generate_protos.py)."""

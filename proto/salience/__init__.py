"""The salience wire schema; `salience.v1` holds the generated stubs of version 1."""

"""Persistence: typed models, the unit of work, bulk writers per backend, migrations."""
